//! Ranking metrics for one held-out item per user, from its 0-based rank among the candidates.
//!
//! With a single relevant item, HR@k equals recall@k, precision@k is HR@k / k, and
//! F1@k = 2·P·R / (P + R). AUC is the fraction of other candidates ranked below the target.
use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

pub const HIT_KS: [usize; 4] = [1, 5, 10, 20];
pub const NDCG_KS: [usize; 3] = [5, 10, 20];

/// Metric name → value for one case.
pub fn case_metrics(rank: usize, candidates: usize) -> Vec<(String, f64)> {
    let mut out = Vec::with_capacity(16);
    for k in HIT_KS {
        let hit = if rank < k { 1.0 } else { 0.0 };
        let precision = hit / k as f64;
        let f1 = if hit > 0.0 {
            2.0 * precision * hit / (precision + hit)
        } else {
            0.0
        };
        out.push((format!("HR@{k}"), hit));
        out.push((format!("P@{k}"), precision));
        out.push((format!("F1@{k}"), f1));
    }
    for k in NDCG_KS {
        let ndcg = if rank < k {
            1.0 / (rank as f64 + 2.0).log2()
        } else {
            0.0
        };
        out.push((format!("NDCG@{k}"), ndcg));
    }
    out.push(("MRR".into(), 1.0 / (rank as f64 + 1.0)));
    let auc = if candidates > 1 {
        1.0 - rank as f64 / (candidates - 1) as f64
    } else {
        1.0
    };
    out.push(("AUC".into(), auc));
    out
}

/// Mean of every metric over the cases added so far.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Metrics {
    pub cases: usize,
    pub means: BTreeMap<String, f64>,
}

impl Metrics {
    pub fn from_ranks(ranks: impl IntoIterator<Item = (usize, usize)>) -> Self {
        let mut sums: BTreeMap<String, f64> = BTreeMap::new();
        let mut cases = 0;
        for (rank, candidates) in ranks {
            cases += 1;
            for (name, value) in case_metrics(rank, candidates) {
                *sums.entry(name).or_default() += value;
            }
        }
        let means = sums.into_iter().map(|(k, v)| (k, v / cases as f64)).collect();
        Self { cases, means }
    }

    /// A metric's mean, 0 when there were no cases.
    pub fn get(&self, name: &str) -> f64 {
        self.means.get(name).copied().unwrap_or(0.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() < 1e-12
    }

    #[test]
    fn hand_computed_single_case() {
        // Target ranked 3rd (rank 2) among 11 candidates.
        let m: BTreeMap<String, f64> = case_metrics(2, 11).into_iter().collect();
        assert_eq!(m["HR@1"], 0.0);
        assert_eq!(m["HR@5"], 1.0);
        assert!(close(m["P@5"], 0.2));
        assert!(close(m["F1@5"], 2.0 * 0.2 / 1.2));
        assert!(close(m["NDCG@5"], 0.5)); // 1 / log2(4)
        assert!(close(m["MRR"], 1.0 / 3.0));
        assert!(close(m["AUC"], 0.8)); // 8 of the 10 others rank below
        assert_eq!(m["F1@1"], 0.0);
    }

    #[test]
    fn means_over_cases() {
        // ranks 0 and 15 among 101 candidates.
        let m = Metrics::from_ranks([(0, 101), (15, 101)]);
        assert_eq!(m.cases, 2);
        assert!(close(m.get("HR@10"), 0.5));
        assert!(close(m.get("HR@20"), 1.0));
        assert!(close(m.get("NDCG@10"), 0.5));
        assert!(close(m.get("NDCG@20"), (1.0 + 1.0 / 17f64.log2()) / 2.0));
        assert!(close(m.get("MRR"), (1.0 + 1.0 / 16.0) / 2.0));
        assert!(close(m.get("AUC"), (1.0 + 0.85) / 2.0));
        assert_eq!(Metrics::from_ranks([]).get("HR@10"), 0.0);
    }
}
