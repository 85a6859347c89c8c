//! Offline evaluation: full ranking over all items for each user's held-out event.
pub mod bootstrap;
pub mod explain;
pub mod metrics;
pub mod references;
pub mod report;

use tch::{Device, Kind, Tensor};

use crate::data::session::starts_new_session;
use crate::data::split::{SequenceSet, Target, UserSequence};
use crate::model::{encode_window, mask_items, Batch, HistoryView, Scorer, WindowPolicy};
pub use metrics::Metrics;

/// Number of best items kept per case (for `--predictions-out`).
pub const TOP_N: usize = 20;

#[derive(Debug, Clone)]
pub struct EvalOptions {
    pub target: Target,
    /// Remove items already in the user's history from the ranking (the target itself stays).
    pub exclude_seen: bool,
    pub batch_size: usize,
    pub max_len: usize,
    pub session_gap_secs: i64,
    pub device: Device,
    /// The events of each case's history the model reads.
    pub window: WindowPolicy,
}

/// One user's outcome.
#[derive(Debug, Clone, PartialEq)]
pub struct CaseResult {
    pub user: usize,
    /// Position of the target in the user's sequence.
    pub position: usize,
    /// 0-based rank of the target; ties count against it.
    pub rank: usize,
    /// Items it was ranked among, itself included.
    pub candidates: usize,
    /// Whether the target event opened a new session.
    pub new_session: bool,
    /// Best items first: (item index, score).
    pub top: Vec<(i64, f32)>,
}

/// The events a case may read: everything before its target.
fn case_input(user: &UserSequence, position: usize) -> HistoryView<'_> {
    HistoryView::new(&user.items, &user.timestamps, &user.types).prefix(position)
}

/// Anything that ranks items for evaluation cases `(user, position)`: the networks and
/// baselines through their encoded input ([`Scorer`]), and references that read the raw history
/// (the synthetic family's oracle, the transition baseline).
pub trait CaseScorer {
    /// `[cases, V]` float scores for each case's target given every event before it.
    fn score_cases(&self, set: &SequenceSet, cases: &[(usize, usize)], opts: &EvalOptions) -> Tensor;
}

impl<S: Scorer + ?Sized> CaseScorer for S {
    fn score_cases(&self, set: &SequenceSet, cases: &[(usize, usize)], opts: &EvalOptions) -> Tensor {
        let rows: Vec<_> = cases
            .iter()
            .map(|&(u, p)| {
                let user = &set.users[u];
                encode_window(
                    case_input(user, p),
                    opts.window.start(p, opts.max_len),
                    user.timestamps[p],
                    opts.max_len,
                    opts.session_gap_secs,
                )
            })
            .collect();
        let held: Vec<&[u32]> = cases.iter().map(|&(u, p)| &set.users[u].items[..p]).collect();
        self.score_next(&Batch::trimmed(&rows, opts.device), &held)
            .to_kind(Kind::Float)
    }
}

/// Ranks every evaluable user's target with `scorer`.
pub fn evaluate(scorer: &dyn CaseScorer, set: &SequenceSet, opts: &EvalOptions) -> Vec<CaseResult> {
    let cases: Vec<(usize, usize)> = set
        .users
        .iter()
        .enumerate()
        .filter_map(|(u, user)| user.target_position(opts.target).map(|p| (u, p)))
        .collect();
    let mut results = Vec::with_capacity(cases.len());
    for chunk in cases.chunks(opts.batch_size.max(1)) {
        results.extend(rank_chunk(scorer, set, chunk, opts));
    }
    results
}

fn rank_chunk(
    scorer: &dyn CaseScorer,
    set: &SequenceSet,
    chunk: &[(usize, usize)],
    opts: &EvalOptions,
) -> Vec<CaseResult> {
    let scores = scorer.score_cases(set, chunk, opts);
    let num_items = scores.size()[1] as usize;
    let targets: Vec<i64> = chunk.iter().map(|&(u, p)| i64::from(set.users[u].items[p])).collect();
    // Masked items (and the padding item) get -inf.
    let mut masked: Vec<Vec<i64>> = Vec::with_capacity(chunk.len());
    for (&(u, p), &target) in chunk.iter().zip(&targets) {
        let mut items = Vec::new();
        if opts.exclude_seen {
            items.extend(
                set.users[u].items[..p]
                    .iter()
                    .map(|&i| i64::from(i))
                    .filter(|&i| i != target),
            );
            items.sort_unstable();
            items.dedup();
        }
        masked.push(items);
    }
    let scores = mask_items(scores, &masked);
    let target_index = Tensor::from_slice(&targets).to_device(scores.device()).unsqueeze(1);
    let target_scores = scores.gather(1, &target_index, false);
    // Ties count against the target: rank = (#items scoring >= target) − 1.
    let ranks = Vec::<i64>::try_from(scores.ge_tensor(&target_scores).sum_dim_intlist(1, false, Kind::Int64) - 1)
        .expect("ranks");
    let k = TOP_N.min(num_items - 1) as i64;
    let (top_scores, top_items) = scores.topk(k, 1, true, true);
    let top_items = Vec::<i64>::try_from(top_items.to_device(Device::Cpu).view(-1)).expect("top-k items");
    let top_scores = Vec::<f32>::try_from(top_scores.to_device(Device::Cpu).view(-1)).expect("top-k scores");
    chunk
        .iter()
        .enumerate()
        .map(|(row, &(u, p))| {
            let user = &set.users[u];
            CaseResult {
                user: u,
                position: p,
                rank: ranks[row] as usize,
                // Every item but the padding item and the masked ones.
                candidates: num_items - 1 - masked[row].len(),
                new_session: starts_new_session(user.timestamps[p] - user.timestamps[p - 1], opts.session_gap_secs),
                top: (row * k as usize..(row + 1) * k as usize)
                    .map(|j| (top_items[j], top_scores[j]))
                    .collect(),
            }
        })
        .collect()
}

/// Each case's NDCG@10, in the order of `results` (the input of paired comparisons).
pub fn ndcg10(results: &[CaseResult]) -> Vec<f64> {
    results
        .iter()
        .map(|r| {
            metrics::case_metrics(r.rank, r.candidates)
                .into_iter()
                .find(|(k, _)| k == "NDCG@10")
                .map_or(0.0, |(_, v)| v)
        })
        .collect()
}

/// Overall metrics and the split by whether the target opened a new session.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct SplitMetrics {
    pub all: Metrics,
    pub new_session: Metrics,
    pub same_session: Metrics,
}

impl SplitMetrics {
    pub fn from_results(results: &[CaseResult]) -> Self {
        let pick = |keep: fn(&CaseResult) -> bool| {
            Metrics::from_ranks(results.iter().filter(|r| keep(r)).map(|r| (r.rank, r.candidates)))
        };
        Self {
            all: pick(|_| true),
            new_session: pick(|r| r.new_session),
            same_session: pick(|r| !r.new_session),
        }
    }
}
