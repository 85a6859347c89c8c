//! Does the device rank like the CPU? The same histories through the CPU in fp32 and through
//! another device/precision, compared top-k list by top-k list.
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::Serialize;

use super::{rank_batch, synthetic_history};
use crate::data::split::UserSequence;
use crate::infer::rank::{Catalogue, Retrieval};
use crate::model::item_indices;
use crate::model::{encode, EncodedSeq, HistoryView, SeqModel};

/// One history to rank: the encoded input and the items to leave out (seen ones, padding).
pub struct Case {
    pub row: EncodedSeq,
    pub exclude: Vec<i64>,
}

impl Case {
    pub fn new(items: &[u32], timestamps: &[i64], types: &[u32], at: i64, model: &SeqModel) -> Self {
        let config = &model.config;
        let row = encode(
            HistoryView::new(items, timestamps, types),
            at,
            config.max_len,
            config.session_gap_secs,
        );
        Self {
            row,
            exclude: item_indices(items),
        }
    }
}

/// `n` histories cut from real users at random points (users reused when `n` exceeds them), each
/// predicted at the moment of the event that followed the cut.
pub fn cases_from_users(users: &[UserSequence], n: usize, seed: u64, model: &SeqModel) -> Vec<Case> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    (0..n)
        .map(|i| {
            let user = &users[i % users.len()];
            let cut = rng.gen_range(1..=user.items.len());
            let at = user
                .timestamps
                .get(cut)
                .copied()
                .unwrap_or(user.timestamps[cut - 1] + 60);
            Case::new(
                &user.items[..cut],
                &user.timestamps[..cut],
                &user.types[..cut],
                at,
                model,
            )
        })
        .collect()
}

/// `n` synthetic histories of random length up to twice the model's window.
pub fn synthetic_cases(n: usize, seed: u64, model: &SeqModel) -> Vec<Case> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let config = &model.config;
    (0..n)
        .map(|_| {
            let len = rng.gen_range(1..=2 * config.max_len);
            let (items, timestamps) = synthetic_history(&mut rng, len, config.num_items, 1_700_000_000);
            let at = timestamps[len - 1] + 60;
            Case::new(&items, &timestamps, &vec![1; len], at, model)
        })
        .collect()
}

/// Top-`k` of every case, `batch_size` at a time, through the serving path.
pub fn rank_cases(
    model: &SeqModel,
    cases: &[Case],
    k: usize,
    batch_size: usize,
    retrieval: Retrieval,
) -> Vec<Vec<(u32, f32)>> {
    let catalogue = Catalogue::new(model.net.item_table(), retrieval);
    cases
        .chunks(batch_size.max(1))
        .flat_map(|chunk| {
            let rows: Vec<&EncodedSeq> = chunk.iter().map(|c| &c.row).collect();
            let exclude: Vec<&[i64]> = chunk.iter().map(|c| c.exclude.as_slice()).collect();
            rank_batch(model, &catalogue, &rows, &exclude, k, |_| {})
        })
        .collect()
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Agreement {
    pub users: usize,
    /// Users whose top-k lists are the same items in the same order.
    pub identical_lists: usize,
    /// Mean size of the intersection of the two top-k sets.
    pub mean_overlap: f64,
    pub min_overlap: usize,
    /// Largest score difference over items that both lists contain.
    pub max_abs_score_diff: f32,
}

pub fn agreement(reference: &[Vec<(u32, f32)>], other: &[Vec<(u32, f32)>]) -> Agreement {
    assert_eq!(reference.len(), other.len(), "the same users on both sides");
    let mut identical_lists = 0;
    let mut overlaps = Vec::with_capacity(reference.len());
    let mut max_abs_score_diff = 0f32;
    for (a, b) in reference.iter().zip(other) {
        if a.iter().map(|x| x.0).eq(b.iter().map(|x| x.0)) {
            identical_lists += 1;
        }
        let mut overlap = 0;
        for (item, score) in a {
            if let Some((_, other_score)) = b.iter().find(|(other_item, _)| other_item == item) {
                overlap += 1;
                max_abs_score_diff = max_abs_score_diff.max((score - other_score).abs());
            }
        }
        overlaps.push(overlap);
    }
    Agreement {
        users: reference.len(),
        identical_lists,
        mean_overlap: overlaps.iter().sum::<usize>() as f64 / overlaps.len().max(1) as f64,
        min_overlap: overlaps.iter().copied().min().unwrap_or(0),
        max_abs_score_diff,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn agreement_counts_order_overlap_and_score_gap() {
        let reference = vec![vec![(1, 0.9), (2, 0.5)], vec![(3, 1.0), (4, 0.2)]];
        let other = vec![vec![(1, 0.8), (2, 0.5)], vec![(4, 0.25), (5, 0.1)]];
        let found = agreement(&reference, &other);
        assert_eq!(found.identical_lists, 1);
        assert_eq!(found.mean_overlap, 1.5);
        assert_eq!(found.min_overlap, 1);
        assert!((found.max_abs_score_diff - 0.1).abs() < 1e-6);
    }
}
