//! Paired bootstrap over users: is model A's mean metric really above model B's?
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::Serialize;

#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct PairedInterval {
    /// mean(a − b)
    pub mean_difference: f64,
    pub lower: f64,
    pub upper: f64,
    pub confidence: f64,
}

/// Percentile confidence interval of mean(a − b), resampling users with replacement.
/// `a[i]` and `b[i]` must belong to the same user.
pub fn paired_bootstrap(a: &[f64], b: &[f64], resamples: usize, confidence: f64, seed: u64) -> PairedInterval {
    assert_eq!(a.len(), b.len(), "paired samples must have equal length");
    let diffs: Vec<f64> = a.iter().zip(b).map(|(x, y)| x - y).collect();
    let n = diffs.len();
    let mean = |values: &mut dyn Iterator<Item = f64>| values.sum::<f64>() / n.max(1) as f64;
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut means: Vec<f64> = (0..resamples)
        .map(|_| mean(&mut (0..n).map(|_| diffs[rng.gen_range(0..n)])))
        .collect();
    means.sort_by(f64::total_cmp);
    let tail = (1.0 - confidence) / 2.0;
    let at = |q: f64| means[((q * (resamples - 1) as f64).round() as usize).min(resamples - 1)];
    PairedInterval {
        mean_difference: mean(&mut diffs.iter().copied()),
        lower: at(tail),
        upper: at(1.0 - tail),
        confidence,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clear_difference_excludes_zero_and_noise_includes_it() {
        let a: Vec<f64> = (0..200).map(|i| 0.5 + (i % 7) as f64 * 0.01).collect();
        let b: Vec<f64> = a.iter().map(|x| x - 0.1).collect();
        let ci = paired_bootstrap(&a, &b, 1000, 0.95, 1);
        assert!((ci.mean_difference - 0.1).abs() < 1e-12);
        assert!((ci.lower - 0.1).abs() < 1e-9 && (ci.upper - 0.1).abs() < 1e-9);

        let noise: Vec<f64> = (0..200).map(|i| if i % 2 == 0 { 1.0 } else { -1.0 }).collect();
        let zeros = vec![0.0; 200];
        let ci = paired_bootstrap(&noise, &zeros, 1000, 0.95, 1);
        assert!(ci.lower < 0.0 && ci.upper > 0.0, "{ci:?}");
    }
}
