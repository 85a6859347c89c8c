//! The training loop: AdamW on next-item cross-entropy at every position, early stopping on
//! validation NDCG@10, best weights restored at the end.
pub mod checkpoint;
pub mod optimizer;
pub mod pages;
pub mod plot;
pub mod windows;

use std::io::IsTerminal;
use std::time::Instant;

use indicatif::{ProgressBar, ProgressStyle};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use tch::{nn, Device, Kind, Tensor};

use crate::data::session::GAP_BUCKET_NONE;
use crate::data::split::{SequenceSet, Target};
use crate::eval::bootstrap::{paired_bootstrap, PairedInterval};
use crate::eval::{evaluate, ndcg10, EvalOptions, SplitMetrics};
use crate::model::artifact::copy_weights;
use crate::model::input::stack_rows;
use crate::model::{Batch, EncodedSeq, ModelConfig, SeqModel};
use checkpoint::{CheckpointError, Progress, RngState};
use optimizer::AdamW;
use windows::{training_windows, Window};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Loss {
    /// Softmax over the whole catalogue.
    Full,
    /// Softmax over the target and `negatives` uniformly sampled items shared by the batch.
    Sampled,
}

/// How an epoch's windows are cut into batches. `xsrec train` shuffles by default; `Default`
/// is what a run record without the field meant (every run before the choice existed grouped).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Batching {
    /// Windows of similar length share a batch (sorted within shuffled groups of 32 batches),
    /// so little compute goes to padding; the order of batches stays random.
    #[default]
    Grouped,
    /// Plain shuffled chunks: every batch a uniform sample of windows, padded to its longest.
    Shuffled,
}

impl Batching {
    fn is_grouped(&self) -> bool {
        *self == Batching::Grouped
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TrainConfig {
    pub seed: u64,
    pub max_epochs: usize,
    pub batch_size: usize,
    /// Absent from older run records and checkpoints, which all batched by length.
    #[serde(default, skip_serializing_if = "Batching::is_grouped")]
    pub batching: Batching,
    pub learning_rate: f64,
    /// Decay the learning rate along a half cosine to zero over this many epochs (step by
    /// step), which also ends training there; constant when absent. A run with a known budget
    /// spends its last epochs settling instead of waiting out the patience.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lr_decay_epochs: Option<usize>,
    pub weight_decay: f64,
    pub grad_clip: f64,
    /// Stop after this many epochs without a better validation NDCG@10.
    pub patience: usize,
    pub loss: Loss,
    pub negatives: usize,
    /// Leave items the user already had earlier in the window out of each position's softmax
    /// (full loss only), matching an evaluation that excludes seen items.
    pub mask_seen: bool,
    /// Loss weight of targets that open a new session relative to those that continue one.
    /// Session starts are where interest carries over from earlier sessions, and they are a
    /// small share of the targets; absent from older run records, which trained with 1.
    #[serde(default = "one")]
    pub session_start_weight: f64,
    #[serde(skip, default = "cpu")]
    pub device: Device,
    /// Show a progress bar.
    #[serde(skip)]
    pub progress: bool,
    /// Where to write a checkpoint after every epoch, and whether to continue from it.
    #[serde(skip)]
    pub checkpoint: Option<CheckpointPlan>,
}

#[derive(Debug, Clone)]
pub struct CheckpointPlan {
    pub dir: std::path::PathBuf,
    /// Continue from the newest checkpoint in `dir` (a fresh start when there is none).
    pub resume: bool,
}

fn cpu() -> Device {
    Device::Cpu
}

fn one() -> f64 {
    1.0
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EpochLog {
    pub epoch: usize,
    pub train_loss: f64,
    pub validation_ndcg10: f64,
    pub sequences_per_sec: f64,
    /// Training seconds from the start of the run to the end of this epoch's validation, not
    /// counting time a resumed run spent stopped (absent from older records).
    #[serde(default)]
    pub elapsed_secs: f64,
}

pub struct TrainOutcome {
    pub model: SeqModel,
    pub epochs: Vec<EpochLog>,
    pub best_epoch: usize,
    pub seconds: f64,
}

impl TrainOutcome {
    /// Validation NDCG@10 of the kept weights.
    pub fn best_validation_ndcg10(&self) -> f64 {
        self.epochs
            .iter()
            .map(|e| e.validation_ndcg10)
            .fold(f64::NEG_INFINITY, f64::max)
    }
}

/// Which of several trained variants a recipe keeps, decided on validation data only.
#[derive(Debug, Clone, Serialize)]
pub struct Choice {
    /// Index of the kept outcome.
    pub kept: usize,
    /// For every outcome after the first: its validation gain over the choice standing when it
    /// was considered.
    pub gains: Vec<ValidationGain>,
}

/// A candidate's per-user validation NDCG@10 against another's (paired bootstrap, 95 %).
#[derive(Debug, Clone, Copy, Serialize)]
pub struct ValidationGain {
    /// Over every validation event.
    pub all: PairedInterval,
    /// Over the validation events that open a session; `None` with fewer than
    /// [`MIN_SESSION_START_CASES`] of them.
    pub session_starts: Option<PairedInterval>,
}

/// Below this many session-start validation events their bootstrap interval is not trusted: a
/// handful of lucky users would pass for evidence.
pub const MIN_SESSION_START_CASES: usize = 30;

impl ValidationGain {
    fn between(richer: &Scored, standing: &Scored) -> Self {
        let starts = |scored: &Scored| -> Vec<f64> {
            scored
                .ndcg10
                .iter()
                .zip(&scored.new_session)
                .filter_map(|(score, &opens)| opens.then_some(*score))
                .collect()
        };
        let (richer_starts, standing_starts) = (starts(richer), starts(standing));
        let interval = |a: &[f64], b: &[f64]| paired_bootstrap(a, b, 2000, 0.95, 7);
        Self {
            all: interval(&richer.ndcg10, &standing.ndcg10),
            session_starts: (richer_starts.len() >= MIN_SESSION_START_CASES)
                .then(|| interval(&richer_starts, &standing_starts)),
        }
    }

    /// Whether the gain is evidence: its interval is above zero over all events or over those
    /// that open a session.
    pub fn is_evidence(&self) -> bool {
        self.all.lower > 0.0 || self.session_starts.is_some_and(|starts| starts.lower > 0.0)
    }
}

/// Per-user validation NDCG@10 and whether each user's validation event opens a session.
struct Scored {
    ndcg10: Vec<f64>,
    new_session: Vec<bool>,
}

/// The first outcome is the baseline; each later (richer) one replaces the standing choice only
/// when its per-user validation NDCG@10 gain over it has a paired bootstrap 95 % interval above
/// zero, over all validation events or over those that open a session. A richer model that
/// validates only slightly better is as often worse on test data (measured on ml-100k,
/// docs/QUALITY.md), so it has to earn its place; session starts are tested on their own
/// because they are few among validation events (a user's second-to-last event rarely opens a
/// session) while being where cross-session structure shows.
pub fn choose_on_validation(set: &SequenceSet, outcomes: &[TrainOutcome], device: Device) -> Choice {
    assert!(!outcomes.is_empty(), "at least one trained candidate");
    if outcomes.len() == 1 {
        return Choice {
            kept: 0,
            gains: Vec::new(),
        };
    }
    let scored = |outcome: &TrainOutcome| {
        let options = validation_options(&outcome.model.config, device);
        let results = evaluate(&outcome.model, set, &options);
        Scored {
            ndcg10: ndcg10(&results),
            new_session: results.iter().map(|r| r.new_session).collect(),
        }
    };
    let mut kept = 0;
    let mut kept_scored = scored(&outcomes[0]);
    let mut gains = Vec::new();
    for (index, outcome) in outcomes.iter().enumerate().skip(1) {
        let candidate = scored(outcome);
        let gain = ValidationGain::between(&candidate, &kept_scored);
        if gain.is_evidence() {
            (kept, kept_scored) = (index, candidate);
        }
        gains.push(gain);
    }
    Choice { kept, gains }
}

fn validation_options(config: &ModelConfig, device: Device) -> EvalOptions {
    EvalOptions {
        target: Target::Validation,
        exclude_seen: true,
        batch_size: 256,
        max_len: config.max_len,
        session_gap_secs: config.session_gap_secs,
        device,
        window: crate::model::WindowPolicy::Newest,
    }
}

/// Trains a fresh model of `model_config` on the training part of `set`, or continues the run
/// checkpointed in `cfg.checkpoint` when it says to resume.
pub fn train(set: &SequenceSet, model_config: ModelConfig, cfg: &TrainConfig) -> Result<TrainOutcome, CheckpointError> {
    tch::manual_seed(cfg.seed as i64);
    let model = SeqModel::new(model_config, cfg.device);
    let mc = &model.config;
    let windows = training_windows(set, mc.max_len, mc.session_gap_secs);
    let mut opt = AdamW::new(&model.vs, cfg.learning_rate, cfg.weight_decay);
    // The epoch cap and the patience may change on resume (to train on where the curve still
    // rises); anything else would make the continuation another run.
    let mut settings = serde_json::to_value(cfg).expect("settings serialize");
    for may_change in ["max_epochs", "patience"] {
        settings.as_object_mut().expect("a struct").remove(may_change);
    }
    let fingerprint = serde_json::json!({
        "model": mc,
        "training": settings,
        "data": { "users": set.users.len(), "events": set.num_events(), "windows": windows.len() },
    });
    let mut rng = ChaCha8Rng::seed_from_u64(cfg.seed);
    let mut progress = Progress {
        epoch: 0,
        optimizer_steps: 0,
        best_epoch: 0,
        best_score: f64::NEG_INFINITY,
        epochs: Vec::new(),
        seconds: 0.0,
        rng: RngState::of(&rng),
        fingerprint,
    };
    let mut best_weights = snapshot(&model.vs);
    if let Some(plan) = cfg.checkpoint.as_ref().filter(|plan| plan.resume) {
        if let Some(mut saved) = checkpoint::load_latest(&plan.dir)? {
            saved.check_same_run(&plan.dir, &progress.fingerprint)?;
            let corrupt = |message: String| CheckpointError::Corrupt {
                path: plan.dir.clone(),
                message,
            };
            let weights_error = |(name, message): (String, String)| corrupt(format!("{name}: {message}"));
            let current = saved.take("model.");
            let best = saved.take("best.");
            // The best weights go in first only to be checked; the current ones are trained on.
            best_weights = best.iter().map(|(name, t)| (name.clone(), t.shallow_clone())).collect();
            copy_weights(&model.vs, best).map_err(weights_error)?;
            copy_weights(&model.vs, current).map_err(weights_error)?;
            opt.restore(saved.progress.optimizer_steps, &saved.tensors)
                .map_err(corrupt)?;
            rng = saved.progress.rng.generator().map_err(corrupt)?;
            progress = saved.progress;
            eprintln!(
                "resuming after epoch {} (best {:.4} at epoch {}) from {}",
                progress.epoch,
                progress.best_score,
                progress.best_epoch,
                plan.dir.display()
            );
        }
    }
    let eval_opts = validation_options(mc, cfg.device);
    // A bar on a terminal; one line per epoch in logs (indicatif hides itself off a terminal).
    let log_lines = cfg.progress && !std::io::stderr().is_terminal();
    let bar = if cfg.progress {
        ProgressBar::new(cfg.max_epochs as u64)
    } else {
        ProgressBar::hidden()
    };
    bar.set_style(
        ProgressStyle::with_template("{elapsed_precise} [{bar:30}] epoch {pos}/{len} (at most {eta} left) {msg}")
            .expect("template"),
    );
    bar.set_position(progress.epoch as u64);
    let started = Instant::now();
    let last_epoch = cfg.max_epochs.min(cfg.lr_decay_epochs.unwrap_or(usize::MAX));
    let finished =
        |progress: &Progress| progress.epoch >= last_epoch || progress.epoch - progress.best_epoch >= cfg.patience;
    while !finished(&progress) {
        let epoch = progress.epoch + 1;
        let epoch_start = Instant::now();
        // Seeding the dropout masks per epoch makes an epoch's draws the same whether or not the
        // run was resumed before it (libtorch's generator, which the LSTM's dropout draws from,
        // cannot be saved either).
        let epoch_seed = cfg.seed.wrapping_add(epoch as u64 * 1_000_003);
        model.net.reseed_dropout(epoch_seed);
        tch::manual_seed(epoch_seed as i64);
        let train_loss = run_epoch(&model, &mut opt, (set, &windows), cfg, epoch, &mut rng);
        let validation = SplitMetrics::from_results(&evaluate(&model, set, &eval_opts));
        let validation_ndcg10 = validation.all.get("NDCG@10");
        let epoch_secs = epoch_start.elapsed().as_secs_f64();
        let sequences_per_sec = windows.len() as f64 / epoch_secs;
        progress.seconds += epoch_secs;
        progress.epochs.push(EpochLog {
            epoch,
            train_loss,
            validation_ndcg10,
            sequences_per_sec,
            elapsed_secs: progress.seconds,
        });
        if validation_ndcg10 > progress.best_score {
            (progress.best_epoch, progress.best_score, best_weights) = (epoch, validation_ndcg10, snapshot(&model.vs));
        }
        progress.epoch = epoch;
        progress.optimizer_steps = opt.steps();
        progress.rng = RngState::of(&rng);
        if let Some(plan) = &cfg.checkpoint {
            let tensors: Vec<(String, Tensor)> = snapshot(&model.vs)
                .into_iter()
                .map(|(name, t)| (format!("model.{name}"), t))
                .chain(
                    best_weights
                        .iter()
                        .map(|(name, t)| (format!("best.{name}"), t.shallow_clone())),
                )
                .chain(opt.state())
                .collect();
            checkpoint::save(&plan.dir, &progress, &tensors)?;
        }
        let status = format!(
            "loss {train_loss:.4} val NDCG@10 {validation_ndcg10:.4} (best {:.4} @ {}) {sequences_per_sec:.0} seq/s",
            progress.best_score, progress.best_epoch
        );
        if log_lines {
            eprintln!("epoch {epoch}: {status} ({:.0} s)", started.elapsed().as_secs_f64());
        }
        bar.set_message(status);
        bar.inc(1);
        pages::return_freed_pages();
    }
    bar.finish();
    restore(&model.vs, &best_weights);
    Ok(TrainOutcome {
        model,
        epochs: progress.epochs,
        best_epoch: progress.best_epoch,
        seconds: progress.seconds,
    })
}

/// The process's peak resident memory so far, in bytes: what a machine that trains this model
/// on this data needs (the logits of a batch over the catalogue dominate on large catalogues).
pub fn peak_rss_bytes() -> Option<u64> {
    let mut usage = std::mem::MaybeUninit::<libc::rusage>::zeroed();
    // SAFETY: getrusage fills the struct it is given; it is read only when the call succeeds.
    let usage = unsafe { (libc::getrusage(libc::RUSAGE_SELF, usage.as_mut_ptr()) == 0).then(|| usage.assume_init()) }?;
    // Linux reports kibibytes.
    u64::try_from(usage.ru_maxrss).ok().map(|kib| kib * 1024)
}

fn snapshot(vs: &nn::VarStore) -> Vec<(String, Tensor)> {
    vs.variables()
        .into_iter()
        .map(|(name, t)| (name, t.detach().copy()))
        .collect()
}

fn restore(vs: &nn::VarStore, weights: &[(String, Tensor)]) {
    let mut vars = vs.variables();
    tch::no_grad(|| {
        for (name, value) in weights {
            vars.get_mut(name).expect("same variables").copy_(value);
        }
    });
}

/// The indices of each step's windows, given the windows' real lengths: every window once (see
/// [`Batching`]).
fn batch_plan(lengths: &[usize], batch_size: usize, batching: Batching, rng: &mut ChaCha8Rng) -> Vec<Vec<usize>> {
    let mut order: Vec<usize> = (0..lengths.len()).collect();
    order.shuffle(rng);
    if batching == Batching::Shuffled {
        return order.chunks(batch_size).map(<[usize]>::to_vec).collect();
    }
    let mut batches = Vec::new();
    for group in order.chunks(batch_size * 32) {
        let mut group = group.to_vec();
        group.sort_by_key(|&i| lengths[i]);
        batches.extend(group.chunks(batch_size).map(<[usize]>::to_vec));
    }
    batches.shuffle(rng);
    batches
}

/// The learning rate `epochs_done` (fractional) epochs into a run.
pub fn scheduled_learning_rate(cfg: &TrainConfig, epochs_done: f64) -> f64 {
    match cfg.lr_decay_epochs {
        None => cfg.learning_rate,
        Some(horizon) => {
            let progress = (epochs_done / horizon.max(1) as f64).min(1.0);
            cfg.learning_rate * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos())
        }
    }
}

/// Trains one pass over `windows` as the run's epoch `epoch` (counted from 1).
fn run_epoch(
    model: &SeqModel,
    opt: &mut AdamW,
    (set, windows): (&SequenceSet, &[Window]),
    cfg: &TrainConfig,
    epoch: usize,
    rng: &mut ChaCha8Rng,
) -> f64 {
    let (mut loss_sum, mut batches) = (0.0, 0);
    let lengths: Vec<usize> = windows.iter().map(|w| w.input.real_len()).collect();
    let plan = batch_plan(&lengths, cfg.batch_size, cfg.batching, rng);
    let plan_len = plan.len() as f64;
    for (index, batch_indices) in plan.into_iter().enumerate() {
        opt.set_learning_rate(scheduled_learning_rate(
            cfg,
            (epoch - 1) as f64 + index as f64 / plan_len,
        ));
        let rows: Vec<&Window> = batch_indices.iter().map(|&i| &windows[i]).collect();
        let width = rows.iter().map(|w| w.input.real_len()).max().unwrap_or(1);
        let (batch, targets) = trimmed_batch(&rows, width, cfg.device);
        let unshown: Vec<&[u32]> = rows.iter().map(|w| &set.users[w.user].items[..w.first_event]).collect();
        let loss = batch_loss(model, (&batch, &unshown), &targets, cfg, rng);
        opt.zero_grad();
        loss.backward();
        opt.clip_grad_norm(cfg.grad_clip);
        opt.step();
        loss_sum += loss.double_value(&[]);
        batches += 1;
    }
    loss_sum / batches.max(1) as f64
}

/// The last `width` positions of each row: everything before them is padding for all rows.
fn trimmed_batch(rows: &[&Window], width: usize, device: Device) -> (Batch, Tensor) {
    let inputs: Vec<&EncodedSeq> = rows.iter().map(|w| &w.input).collect();
    let targets = stack_rows(rows.iter().map(|w| &w.targets[w.targets.len() - width..]), device);
    (Batch::last_columns(&inputs, width, device), targets)
}

/// The loss of a batch; `unshown[row]` are the user's items before the row's window.
fn batch_loss(
    model: &SeqModel,
    (batch, unshown): (&Batch, &[&[u32]]),
    targets: &Tensor,
    cfg: &TrainConfig,
    rng: &mut ChaCha8Rng,
) -> Tensor {
    let hidden = model.net.hidden(batch, true);
    let d = hidden.size()[2];
    let all_targets = targets;
    let keep = targets.ne(0).view(-1).nonzero().squeeze_dim(1);
    let hidden = hidden.view([-1, d]).index_select(0, &keep);
    let targets = targets.view(-1).index_select(0, &keep);
    let (logits, target_column) = match cfg.loss {
        Loss::Full if cfg.mask_seen => {
            let (rows, columns) = seen_cells(&batch.items, all_targets, model.config.num_items, Cells::Masked);
            let mut logits = model.net.score(&hidden);
            // In place and sparse: a dense [N, V] mask cost two passes over the logits (forward
            // and backward) plus building it, 10 % of an ML-1M step; the cells are O(L²) per row.
            let indices = [rows, columns].map(|cells| Some(Tensor::from_slice(&cells).to_device(cfg.device)));
            let excluded = Tensor::full([], f64::NEG_INFINITY, (logits.kind(), cfg.device));
            let _ = logits.index_put_(&indices, &excluded, false);
            (logits, targets.shallow_clone())
        }
        Loss::Full if model.config.features.repeat_term => {
            let cells = Cells::Held { unshown };
            let (rows, columns) = seen_cells(&batch.items, all_targets, model.config.num_items, cells);
            (
                model.net.score_with_repeats(&hidden, &rows, &columns),
                targets.shallow_clone(),
            )
        }
        Loss::Full => (model.net.score(&hidden), targets.shallow_clone()),
        Loss::Sampled => {
            let table = model.net.item_table();
            let num_items = table.size()[0];
            let negatives: Vec<i64> = (0..cfg.negatives)
                .map(|_| rand::Rng::gen_range(rng, 1..num_items))
                .collect();
            let negatives = Tensor::from_slice(&negatives).to_device(cfg.device);
            let positive = (&hidden * table.index_select(0, &targets)).sum_dim_intlist(-1, true, Kind::Float);
            let negative = hidden.matmul(&table.index_select(0, &negatives).tr());
            // A sampled "negative" that is the target must not push its own score down.
            let collision = negatives.unsqueeze(0).eq_tensor(&targets.unsqueeze(1));
            let logits = Tensor::cat(&[positive, negative.masked_fill(&collision, f64::NEG_INFINITY)], 1);
            let column = Tensor::zeros([logits.size()[0]], (Kind::Int64, cfg.device));
            (logits, column)
        }
    };
    let losses = -logits
        .log_softmax(-1, Kind::Float)
        .gather(1, &target_column.unsqueeze(1), false)
        .squeeze_dim(1);
    let starts = session_start_targets(&batch.prediction_gaps)
        .view(-1)
        .index_select(0, &keep);
    let weights = starts.to_kind(Kind::Float) * (cfg.session_start_weight - 1.0) + 1.0;
    (losses * &weights).sum(Kind::Float) / weights.sum(Kind::Float)
}

/// `[B, L]` bool: whether the event each position predicts opens a new session, read from the
/// prediction-gap bucket (which marks gaps past the session threshold, see [`gap_bucket`]).
///
/// [`gap_bucket`]: crate::data::session::gap_bucket
fn session_start_targets(prediction_gaps: &Tensor) -> Tensor {
    prediction_gaps
        .gt(GAP_BUCKET_NONE)
        .logical_and(&prediction_gaps.remainder(2).eq(1))
}

/// Which of a position's earlier items [`seen_cells`] lists.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Cells<'a> {
    /// The logits to leave out of the softmax: the window's items and item 0 (padding), but
    /// never the position's own target (a repeat is a right answer).
    Masked,
    /// The logits the repeat term raises: every item the user had, `unshown[row]` (before the
    /// window) and the window's, the target too when it is one of them.
    Held { unshown: &'a [&'a [u32]] },
}

/// Logits of training positions, as `(rows, columns)`: for every position with a target (rows
/// numbered as `targets.ne(0)` keeps them, row-major), the items its row had at or before it,
/// as `cells` chooses them.
fn seen_cells(items: &Tensor, targets: &Tensor, num_items: usize, cells: Cells) -> (Vec<i64>, Vec<i64>) {
    let host = |t: &Tensor| Vec::<i64>::try_from(t.to_device(Device::Cpu).view(-1)).expect("int64 ids");
    let width = items.size()[1] as usize;
    let (items, targets) = (host(items), host(targets));
    let (mut rows, mut columns) = (Vec::new(), Vec::new());
    let mut kept_row = 0;
    let mut had = vec![false; num_items];
    for (row, (row_items, row_targets)) in items.chunks(width).zip(targets.chunks(width)).enumerate() {
        let mut distinct = match cells {
            Cells::Masked => vec![0],
            Cells::Held { .. } => Vec::new(),
        };
        had[0] = true;
        if let Cells::Held { unshown } = cells {
            for &item in unshown[row] {
                if !std::mem::replace(&mut had[item as usize], true) {
                    distinct.push(i64::from(item));
                }
            }
        }
        for (&item, &target) in row_items.iter().zip(row_targets) {
            if !std::mem::replace(&mut had[item as usize], true) {
                distinct.push(item);
            }
            if target == 0 {
                continue;
            }
            for &seen in distinct
                .iter()
                .filter(|&&seen| cells != Cells::Masked || seen != target)
            {
                rows.push(kept_row);
                columns.push(seen);
            }
            kept_row += 1;
        }
        had[0] = false;
        for &seen in &distinct {
            had[seen as usize] = false;
        }
    }
    (rows, columns)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::session::{gap_bucket, GAP_BUCKET_PAD};
    use rand::Rng;

    /// Padded positions of a plan: each batch is as wide as its longest window.
    fn padding(plan: &[Vec<usize>], lengths: &[usize]) -> usize {
        plan.iter()
            .map(|batch| {
                let width = batch.iter().map(|&i| lengths[i]).max().unwrap_or(0);
                batch.iter().map(|&i| width - lengths[i]).sum::<usize>()
            })
            .sum()
    }

    #[test]
    fn both_batchings_take_every_window_once_and_grouping_pads_less() {
        let mut rng = ChaCha8Rng::seed_from_u64(7);
        for _ in 0..20 {
            let windows = rng.gen_range(1..3000);
            let batch_size = rng.gen_range(1..100);
            let lengths: Vec<usize> = (0..windows).map(|_| rng.gen_range(1..=200)).collect();
            let plans = [Batching::Grouped, Batching::Shuffled]
                .map(|batching| batch_plan(&lengths, batch_size, batching, &mut ChaCha8Rng::seed_from_u64(1)));
            for plan in &plans {
                let mut taken: Vec<usize> = plan.concat();
                taken.sort_unstable();
                assert_eq!(taken, (0..windows).collect::<Vec<_>>());
                assert!(plan.iter().all(|batch| !batch.is_empty() && batch.len() <= batch_size));
                // Only one batch per group of 32 may be short: the last of the group.
                let short = plan.iter().filter(|batch| batch.len() < batch_size).count();
                assert!(short <= windows.div_ceil(batch_size * 32), "{short} short batches");
            }
            let [grouped, shuffled] = &plans;
            assert!(padding(grouped, &lengths) <= padding(shuffled, &lengths));
            // Shuffled batches are consecutive runs of one shuffled order, so they are the order
            // the same generator's shuffle gives.
            let mut order: Vec<usize> = (0..windows).collect();
            order.shuffle(&mut ChaCha8Rng::seed_from_u64(1));
            assert_eq!(shuffled.concat(), order);
        }
    }

    #[test]
    fn seen_cells_are_each_positions_earlier_items_masked_with_padding_but_not_its_target() {
        let items = Tensor::from_slice(&[0i64, 0, 3, 5, 4, 1, 4, 2]).view([2, 4]);
        let targets = Tensor::from_slice(&[0i64, 0, 5, 2, 1, 4, 2, 4]).view([2, 4]);
        let (rows, columns) = seen_cells(&items, &targets, 6, Cells::Masked);
        assert_eq!(rows, [0, 0, 1, 1, 1, 2, 2, 3, 3, 4, 4, 4, 5, 5, 5]);
        assert_eq!(columns, [0, 3, 0, 3, 5, 0, 4, 0, 1, 0, 4, 1, 0, 1, 2]);
        // The repeat term's cells: no padding, the item the first row's user had before its
        // window (2) at each of its positions, and the targets that are repeats (2 at row 1, 4
        // at rows 3 and 5).
        let unshown: [&[u32]; 2] = [&[2, 2], &[]];
        let (rows, columns) = seen_cells(&items, &targets, 6, Cells::Held { unshown: &unshown });
        assert_eq!(rows, [0, 0, 1, 1, 1, 2, 3, 3, 4, 4, 5, 5, 5]);
        assert_eq!(columns, [2, 3, 2, 3, 5, 4, 4, 1, 4, 1, 4, 1, 2]);
    }

    #[test]
    fn seen_cells_match_the_definition_on_random_batches() {
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        for case in 0..40 {
            let (b, l, v) = (rng.gen_range(1..6), rng.gen_range(1..30), rng.gen_range(2..40));
            let unshown: Vec<Vec<u32>> = (0..b)
                .map(|_| (0..rng.gen_range(0..8)).map(|_| rng.gen_range(1..v) as u32).collect())
                .collect();
            let unshown: Vec<&[u32]> = unshown.iter().map(Vec::as_slice).collect();
            let cells = match case % 2 {
                0 => Cells::Masked,
                _ => Cells::Held { unshown: &unshown },
            };
            let items: Vec<i64> = (0..b * l).map(|_| rng.gen_range(0..v)).collect();
            let targets: Vec<i64> = (0..b * l).map(|_| rng.gen_range(0..v)).collect();
            let (rows, columns) = seen_cells(
                &Tensor::from_slice(&items).view([b, l]),
                &Tensor::from_slice(&targets).view([b, l]),
                v as usize,
                cells,
            );
            let mut expected = Vec::new();
            let kept = (0..b * l).filter(|&cell| targets[cell as usize] != 0);
            for (row, cell) in kept.enumerate() {
                let (start, target) = (cell / l * l, targets[cell as usize]);
                let earlier = &items[start as usize..=cell as usize];
                let before = unshown[(cell / l) as usize];
                let listed = |item: i64| match cells {
                    Cells::Masked => item != target && (item == 0 || earlier.contains(&item)),
                    Cells::Held { .. } => item != 0 && (earlier.contains(&item) || before.contains(&(item as u32))),
                };
                for item in (0..v).filter(|&item| listed(item)) {
                    expected.push((row as i64, item));
                }
            }
            let mut got: Vec<(i64, i64)> = rows.into_iter().zip(columns).collect();
            got.sort_unstable();
            assert_eq!(got, expected);
        }
    }

    #[test]
    fn the_learning_rate_decays_along_a_half_cosine_to_zero_at_the_horizon() {
        let mut cfg: TrainConfig = serde_json::from_value(serde_json::json!({
            "seed": 1, "max_epochs": 10, "batch_size": 8, "learning_rate": 0.002,
            "weight_decay": 0.0, "grad_clip": 1.0, "patience": 5, "loss": "full",
            "negatives": 0, "mask_seen": true
        }))
        .unwrap();
        assert_eq!(scheduled_learning_rate(&cfg, 7.5), 0.002, "constant without a horizon");
        cfg.lr_decay_epochs = Some(4);
        let at = |epochs_done: f64| scheduled_learning_rate(&cfg, epochs_done);
        assert_eq!(at(0.0), 0.002);
        assert!(
            (at(1.0) - 0.002 * (2.0 + 2f64.sqrt()) / 4.0).abs() < 1e-15,
            "{}",
            at(1.0)
        );
        assert!((at(2.0) - 0.001).abs() < 1e-15);
        assert!(at(4.0).abs() < 1e-15 && at(9.0).abs() < 1e-15);
        assert!(
            (1..16).all(|q| at(q as f64 / 4.0) < at((q - 1) as f64 / 4.0)),
            "falls at every step"
        );
    }

    #[test]
    fn session_start_targets_are_the_gaps_past_the_session_threshold() {
        let gap = 1800;
        let buckets = [
            GAP_BUCKET_PAD,
            GAP_BUCKET_NONE,
            gap_bucket(0, gap),
            gap_bucket(gap, gap),
            gap_bucket(gap + 1, gap),
            gap_bucket(86_400 * 30, gap),
            gap_bucket(1700, gap),
        ];
        let starts = Vec::<bool>::try_from(session_start_targets(&Tensor::from_slice(&buckets))).unwrap();
        assert_eq!(starts, [false, false, false, false, true, true, false]);
    }

    /// `users` validation scores, the first `starts` of them opening a session; the richer
    /// candidate gains `start_gain` there and `continuing_gain` elsewhere, plus noise.
    fn pair(users: usize, starts: usize, start_gain: f64, continuing_gain: f64, seed: u64) -> (Scored, Scored) {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let new_session: Vec<bool> = (0..users).map(|u| u < starts).collect();
        let standing: Vec<f64> = (0..users).map(|_| rand::Rng::gen_range(&mut rng, 0.0..0.6)).collect();
        let richer = standing
            .iter()
            .zip(&new_session)
            .map(|(score, &opens)| {
                let gain = if opens { start_gain } else { continuing_gain };
                score + gain + rand::Rng::gen_range(&mut rng, -0.2..0.2)
            })
            .collect();
        let scored = |ndcg10| Scored {
            ndcg10,
            new_session: new_session.clone(),
        };
        (scored(richer), scored(standing))
    }

    #[test]
    fn a_gain_at_session_starts_alone_is_evidence_when_there_are_enough_of_them() {
        for seed in 0..5 {
            // 100 of 1,000 users open a session and gain 0.2; the rest lose 0.02: overall 0.002.
            let (richer, standing) = pair(1000, 100, 0.2, -0.02, seed);
            let gain = ValidationGain::between(&richer, &standing);
            assert!(gain.all.lower < 0.0, "{gain:?}");
            assert!(gain.session_starts.unwrap().lower > 0.0, "{gain:?}");
            assert!(gain.is_evidence());
            // Too few session starts for an interval: only the overall one decides.
            let (richer, standing) = pair(1000, MIN_SESSION_START_CASES - 1, 0.5, 0.0, seed);
            let gain = ValidationGain::between(&richer, &standing);
            assert!(gain.session_starts.is_none());
            assert_eq!(gain.is_evidence(), gain.all.lower > 0.0);
            // Noise alone is not evidence, nor is a loss.
            for (start_gain, continuing_gain) in [(0.0, 0.0), (-0.05, -0.05)] {
                let (richer, standing) = pair(1000, 200, start_gain, continuing_gain, seed);
                assert!(!ValidationGain::between(&richer, &standing).is_evidence());
            }
            // A gain everywhere is.
            let (richer, standing) = pair(1000, 100, 0.05, 0.05, seed);
            let gain = ValidationGain::between(&richer, &standing);
            assert!(gain.all.lower > 0.0 && gain.is_evidence(), "{gain:?}");
        }
    }
}
