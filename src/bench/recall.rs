//! Retrieval with a first stage against exact scoring on the same hidden states: recall@k of
//! the shortlisted lists, ranking time per batch of each, and the first stage's size and build
//! time.
use std::time::Instant;

use serde::Serialize;
use tch::Tensor;

use super::parity::{agreement, Case};
use crate::infer::rank::{Catalogue, Retrieval, Scan};
use crate::model::{Batch, EncodedSeq, SeqModel};

#[derive(Debug, Clone, Serialize)]
pub struct RecallRow {
    /// `exact` (the reference), or the first stage and its shortlist.
    pub retrieval: String,
    /// Mean share of the exact top-k that the list holds.
    pub recall: f64,
    pub min_overlap: usize,
    pub identical_lists: usize,
    /// Median over batches.
    pub ms_per_batch: f64,
    /// Bytes held besides the model's table (the packed copy, or the codes).
    pub extra_mib: f64,
    pub build_seconds: f64,
    /// Rows an int8 or bf16 shortlist could not prove exact, ranked from a second scan.
    pub unsettled_rows: u64,
}

/// Hidden states of `cases` in batches of `batch_size`, then exact retrieval and every first
/// stage with every shortlist in turn over them.
pub fn measure(
    model: &SeqModel,
    cases: &[Case],
    k: usize,
    batch_size: usize,
    scans: &[Scan],
    shortlists: &[usize],
) -> Vec<RecallRow> {
    let batches: Vec<(Tensor, Vec<&[i64]>)> = cases
        .chunks(batch_size.max(1))
        .map(|chunk| {
            let rows: Vec<&EncodedSeq> = chunk.iter().map(|c| &c.row).collect();
            let hidden = tch::no_grad(|| model.last_hidden(&Batch::trimmed(&rows, model.device())));
            (hidden, chunk.iter().map(|c| c.exclude.as_slice()).collect())
        })
        .collect();
    let retrievals = std::iter::once(Retrieval::Exact).chain(scans.iter().flat_map(|&scan| {
        shortlists
            .iter()
            .map(move |&shortlist| Retrieval::Shortlist { scan, shortlist })
    }));
    let mut exact = Vec::new();
    let mut rows = Vec::new();
    for retrieval in retrievals {
        let started = Instant::now();
        let catalogue = Catalogue::new(model.net.item_table(), retrieval);
        let build_seconds = started.elapsed().as_secs_f64();
        let mut times = Vec::with_capacity(batches.len());
        let mut lists = Vec::with_capacity(cases.len());
        for (hidden, exclude) in &batches {
            let started = Instant::now();
            lists.extend(catalogue.rank(hidden, exclude, &vec![k; exclude.len()]));
            times.push(started.elapsed().as_secs_f64() * 1e3);
        }
        times.sort_by(f64::total_cmp);
        if exact.is_empty() {
            exact = lists.clone();
        }
        let found = agreement(&exact, &lists);
        rows.push(RecallRow {
            retrieval: match retrieval {
                Retrieval::Exact => "exact".to_owned(),
                Retrieval::Shortlist { scan, shortlist } => format!("{scan} {shortlist}"),
            },
            recall: found.mean_overlap / k.max(1) as f64,
            min_overlap: found.min_overlap,
            identical_lists: found.identical_lists,
            ms_per_batch: times.get(times.len() / 2).copied().unwrap_or(0.0),
            extra_mib: catalogue.extra_bytes() as f64 / f64::from(1 << 20),
            build_seconds,
            unsettled_rows: catalogue.unsettled_rows(),
        });
    }
    rows
}
