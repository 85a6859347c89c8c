//! Dropout whose masks come from a counter-based hash instead of libtorch's CPU generator.
//!
//! libtorch draws a CPU dropout mask one element at a time from its Mersenne twister (its
//! vectorised MKL path runs on Intel CPUs only): 11 % of an ML-1M training step on this AMD
//! machine, serial while the other cores wait. Here element `i` of a mask is kept when a hash of
//! `i` and the call's key clears the threshold, so a mask costs a few integer operations per
//! element, and every draw depends only on the seed, the call's rank since the last reseed and
//! the element's index: a run reseeded at each epoch draws the same masks whether or not it was
//! resumed. On a GPU libtorch's own dropout is used (its generator is parallel already).
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use tch::{Device, Kind, Tensor};

/// The keys of the masks a network draws, shared by all its dropout sites.
#[derive(Debug, Default)]
pub struct MaskSource {
    seed: AtomicU64,
    calls: AtomicU64,
}

impl MaskSource {
    /// Restarts the sequence of masks from `seed`.
    pub fn reseed(&self, seed: u64) {
        self.seed.store(seed, Ordering::SeqCst);
        self.calls.store(0, Ordering::SeqCst);
    }

    fn next_key(&self) -> u32 {
        let call = self.calls.fetch_add(1, Ordering::SeqCst);
        let mixed = splitmix64(self.seed.load(Ordering::SeqCst) ^ splitmix64(call));
        (mixed ^ (mixed >> 32)) as u32
    }
}

/// One dropout site: zeroes each element with probability `p` in training and scales the rest
/// by `1 / (1 − p)`.
#[derive(Debug, Clone)]
pub struct Dropout {
    p: f64,
    source: Arc<MaskSource>,
}

impl Dropout {
    pub fn new(p: f64, source: &Arc<MaskSource>) -> Self {
        Self {
            p,
            source: Arc::clone(source),
        }
    }

    pub fn is_active(&self) -> bool {
        self.p > 0.0
    }

    pub fn apply(&self, x: &Tensor, train: bool) -> Tensor {
        if !train || !self.is_active() {
            return x.shallow_clone();
        }
        if x.device() != Device::Cpu {
            return x.dropout(self.p, true);
        }
        x * keep_mask(&x.size(), self.p, self.source.next_key()).to_kind(x.kind())
    }
}

/// A float tensor of `size` holding `1 / (1 − p)` where an element is kept and 0 where it is
/// dropped; element `i` is dropped when `hash(i, key) < p · 2³²`.
fn keep_mask(size: &[i64], p: f64, key: u32) -> Tensor {
    let mask = Tensor::empty(size, (Kind::Float, Device::Cpu));
    let len = mask.numel();
    // The mask is fresh, contiguous and not shared, so writing its storage in place is sound.
    let values = unsafe { std::slice::from_raw_parts_mut(mask.data_ptr() as *mut f32, len) };
    fill_keep_mask(values, p, key);
    mask
}

fn fill_keep_mask(values: &mut [f32], p: f64, key: u32) {
    let threshold = (p * 4_294_967_296.0).min(u32::MAX as f64) as u32;
    let scale = (1.0 / (1.0 - p)) as f32;
    for (index, value) in values.iter_mut().enumerate() {
        // Hashing the index before the key goes in keeps two keys' masks from being shifted
        // copies of each other.
        let hash = lowbias32(lowbias32(index as u32) ^ key);
        *value = if hash >= threshold { scale } else { 0.0 };
    }
}

/// A 32-bit integer hash with low bias (C. Wellons' `lowbias32`): a bijection, each output bit
/// depending on every input bit.
fn lowbias32(mut x: u32) -> u32 {
    x ^= x >> 16;
    x = x.wrapping_mul(0x7feb_352d);
    x ^= x >> 15;
    x = x.wrapping_mul(0x846c_a68b);
    x ^ (x >> 16)
}

fn splitmix64(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mask(len: usize, p: f64, key: u32) -> Vec<f32> {
        let mut values = vec![0.0; len];
        fill_keep_mask(&mut values, p, key);
        values
    }

    #[test]
    fn masks_drop_the_asked_share_independently_and_keep_the_mean() {
        let n = 1 << 20;
        for (p, key) in [(0.1, 1), (0.3, 77), (0.5, 0xdead_beef), (0.9, 5)] {
            let values = mask(n, p, key);
            let dropped = values.iter().filter(|&&v| v == 0.0).count() as f64 / n as f64;
            // Binomial sd is at most 0.0005 here: 5 sd.
            assert!((dropped - p).abs() < 0.0025, "p {p}: dropped {dropped}");
            let mean = values.iter().map(|&v| v as f64).sum::<f64>() / n as f64;
            assert!((mean - 1.0).abs() < 0.01, "p {p}: mean {mean}");
            // Neighbours are independent: both dropped about p² of the time.
            let pairs = values.windows(2).filter(|w| w[0] == 0.0 && w[1] == 0.0).count() as f64 / (n - 1) as f64;
            assert!((pairs - p * p).abs() < 0.003, "p {p}: pairs {pairs} vs {}", p * p);
        }
    }

    #[test]
    fn masks_of_different_keys_are_unrelated_even_when_shifted() {
        let n = 1 << 16;
        let (a, b) = (mask(n, 0.5, 1), mask(n, 0.5, 2));
        for shift in 0..64 {
            let agree = a.iter().zip(&b[shift..]).filter(|(x, y)| x == y).count() as f64 / (n - shift) as f64;
            assert!((agree - 0.5).abs() < 0.02, "shift {shift}: agree {agree}");
        }
    }

    #[test]
    fn the_same_seed_draws_the_same_masks_and_training_off_leaves_the_input() {
        let source = Arc::new(MaskSource::default());
        let dropout = Dropout::new(0.3, &source);
        let x = Tensor::ones([4, 50, 8], (Kind::Float, Device::Cpu));
        source.reseed(9);
        let first = [dropout.apply(&x, true), dropout.apply(&x, true)];
        assert!(
            first[0].not_equal_tensor(&first[1]).any().int64_value(&[]) == 1,
            "each call draws anew"
        );
        source.reseed(9);
        for drawn in &first {
            assert!(dropout.apply(&x, true).equal(drawn));
        }
        source.reseed(10);
        assert!(!dropout.apply(&x, true).equal(&first[0]));
        assert!(dropout.apply(&x, false).equal(&x));
    }
}
