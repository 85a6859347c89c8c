//! The approximate index: every item's embedding compressed to 4-bit product-quantization
//! codes, scanned by byte-shuffle table lookups, to pick a shortlist that exact scoring re-ranks.
//!
//! Why this index and not a partition one (IVF, HNSW): those skip the items far from the query,
//! which works when the table clusters; on the random large artifact IVF reached recall@10 0.906
//! only with half the table scanned (docs/BENCHMARKS.md), so it saved little. Scanning a
//! compressed copy of every item keeps recall independent of how the table clusters, and a
//! 4-bit code read with a byte shuffle costs a fraction of a multiply-add per dimension: the
//! approach of FAISS's fast-scan PQ and of ScaNN. Neither has a maintained Rust crate; the
//! index is small enough to own.

use super::{search_tiles, BestK, TILE_ITEMS};

/// Dimensions per subspace; each subspace has [`CENTROIDS`] centroids.
const SUBSPACE_DIMS: usize = 2;
/// Centroids per subspace: a 4-bit code, the index of a byte shuffle.
const CENTROIDS: usize = 16;
/// Items per block: two 256-bit registers of codes, 16 items × two subspaces each.
const BLOCK_ITEMS: usize = 32;
/// Bytes of codes per block and pair of subspaces.
const PAIR_BYTES: usize = 64;
/// Bytes of one state's lookup tables per pair of subspaces: one 256-bit register.
const TABLE_BYTES: usize = 32;
/// Pairs of subspaces whose lookups the kernel adds in bytes before widening them: four
/// lookups of at most [`TABLE_MAX`] fit a byte.
const PAIRS_PER_STEP: usize = 4;
/// Largest quantized lookup-table entry.
const TABLE_MAX: u8 = 63;
/// Items sampled to learn the centroids, and Lloyd iterations over them.
const TRAINING_ITEMS: usize = 65_536;
const ITERATIONS: usize = 10;
/// Rows scored together against a block: 4 accumulators and 2 byte sums per row, a lookup
/// table and a result fit AVX2's 16 registers for two rows.
const GROUP_ROWS: usize = 2;
/// Subspaces whose lookups sum without overflow in the kernel's 16-bit lanes.
const MAX_SUBSPACES: usize = (u16::MAX / TABLE_MAX as u16) as usize;

/// Product-quantization codes of the item table, laid out for the lookup kernel.
pub(super) struct QuantizedItems {
    dim: usize,
    /// A multiple of 2 × [`PAIRS_PER_STEP`]: the kernel reads subspaces in pairs, four pairs a
    /// step; dimensions past `dim` are zero.
    subspaces: usize,
    items: usize,
    /// `[subspace][centroid][SUBSPACE_DIMS]`.
    centroids: Vec<f32>,
    /// Per block of [`BLOCK_ITEMS`] items and pair of subspaces `(2p, 2p + 1)`, 64 bytes, one
    /// code per byte: byte `j < 16` is item `j`'s code for subspace `2p`, byte `16 + j` its code
    /// for subspace `2p + 1`; bytes `32 ..` the same for items `16 + j`. A byte per code, not a
    /// nibble, so that the kernel's shuffles read the codes straight from memory.
    codes: Vec<u8>,
    avx2: bool,
}

impl QuantizedItems {
    /// Learns the centroids from an even sample of the items (item 0, the padding, left out)
    /// and encodes every item; `None` for widths past what the kernel can sum.
    pub(super) fn new(table: &[f32], dim: usize) -> Option<Self> {
        let subspaces = dim.div_ceil(SUBSPACE_DIMS).next_multiple_of(2 * PAIRS_PER_STEP);
        if dim == 0 || subspaces > MAX_SUBSPACES {
            return None;
        }
        let items = table.len() / dim;
        let sub = |item: usize, subspace: usize| -> [f32; SUBSPACE_DIMS] {
            std::array::from_fn(|d| {
                let k = subspace * SUBSPACE_DIMS + d;
                if k < dim {
                    table[item * dim + k]
                } else {
                    0.0
                }
            })
        };
        let candidates = items.saturating_sub(1);
        let sample: Vec<usize> = (0..candidates.min(TRAINING_ITEMS))
            .map(|i| 1 + i * candidates / candidates.min(TRAINING_ITEMS))
            .collect();
        let mut centroids = Vec::with_capacity(subspaces * CENTROIDS * SUBSPACE_DIMS);
        for subspace in 0..subspaces {
            let points: Vec<[f32; SUBSPACE_DIMS]> = sample.iter().map(|&item| sub(item, subspace)).collect();
            centroids.extend(k_means(&points).into_iter().flatten());
        }
        let mut index = Self {
            dim,
            subspaces,
            items,
            centroids,
            codes: vec![0; items.div_ceil(BLOCK_ITEMS) * subspaces / 2 * PAIR_BYTES],
            avx2: avx2(),
        };
        for item in 0..items {
            for subspace in 0..subspaces {
                let code = nearest(index.subspace_centroids(subspace), &sub(item, subspace));
                let byte = index.code_position(item, subspace);
                index.codes[byte] = code as u8;
            }
        }
        Some(index)
    }

    fn subspace_centroids(&self, subspace: usize) -> &[[f32; SUBSPACE_DIMS]] {
        let values = &self.centroids[subspace * CENTROIDS * SUBSPACE_DIMS..][..CENTROIDS * SUBSPACE_DIMS];
        let (chunks, _) = values.as_chunks::<SUBSPACE_DIMS>();
        chunks
    }

    /// The byte of item `item`'s code for `subspace`.
    fn code_position(&self, item: usize, subspace: usize) -> usize {
        let (block, j) = (item / BLOCK_ITEMS, item % BLOCK_ITEMS);
        let pairs = self.subspaces / 2;
        (block * pairs + subspace / 2) * PAIR_BYTES + (j / 16) * 32 + (subspace % 2) * 16 + j % 16
    }

    /// Bytes held: codes and centroids.
    pub(super) fn bytes(&self) -> usize {
        self.codes.len() + self.centroids.len() * std::mem::size_of::<f32>()
    }

    /// One state's lookup tables, quantized to `0..=TABLE_MAX` with one step for all subspaces
    /// (so that sums compare across subspaces): `[pair][32]`, the two subspaces of a pair side
    /// by side as the kernel's two 128-bit lanes read them. Six bits add noise of about 4% of
    /// the score's spread in all, where the codes themselves add about a third.
    fn lookup_tables(&self, state: &[f32], out: &mut [u8]) {
        let mut tables = vec![0f32; self.subspaces * CENTROIDS];
        for (subspace, table) in tables.chunks_exact_mut(CENTROIDS).enumerate() {
            for (value, centroid) in table.iter_mut().zip(self.subspace_centroids(subspace)) {
                *value = (0..SUBSPACE_DIMS)
                    .map(|d| subspace * SUBSPACE_DIMS + d)
                    .filter(|&k| k < self.dim)
                    .map(|k| state[k] * centroid[k % SUBSPACE_DIMS])
                    .sum();
            }
        }
        let lowest: Vec<f32> = tables
            .chunks_exact(CENTROIDS)
            .map(|t| t.iter().copied().fold(f32::INFINITY, f32::min))
            .collect();
        let widest = tables
            .chunks_exact(CENTROIDS)
            .zip(&lowest)
            .map(|(t, low)| t.iter().copied().fold(f32::NEG_INFINITY, f32::max) - low)
            .fold(0f32, f32::max);
        let top = f32::from(TABLE_MAX);
        let step = if widest.is_finite() && widest > 0.0 {
            widest / top
        } else {
            1.0
        };
        for (subspace, (table, low)) in tables.chunks_exact(CENTROIDS).zip(&lowest).enumerate() {
            let at = (subspace / 2) * TABLE_BYTES + (subspace % 2) * 16;
            for (byte, &value) in out[at..at + CENTROIDS].iter_mut().zip(table) {
                // A NaN state gives 0s here; exact re-ranking then drops its scores.
                *byte = ((value - low) / step).round().clamp(0.0, top) as u8;
            }
        }
    }

    /// Offers every item's approximate score for each state (`states`: rows × dim) to that
    /// row's `best`, skipping the `excluded` items (sorted) of each row.
    pub(super) fn search(&self, states: &[f32], excluded: &[Vec<i64>], best: &mut [BestK]) {
        let pairs = self.subspaces / 2;
        let row_bytes = pairs * TABLE_BYTES;
        let mut tables = vec![0u8; best.len().div_ceil(GROUP_ROWS) * GROUP_ROWS * row_bytes];
        for (state, out) in states.chunks_exact(self.dim).zip(tables.chunks_exact_mut(row_bytes)) {
            self.lookup_tables(state, out);
        }
        let block_bytes = pairs * PAIR_BYTES;
        search_tiles(self.items, GROUP_ROWS, excluded, best, |tile, group, out| {
            let group_tables = &tables[group * GROUP_ROWS * row_bytes..][..GROUP_ROWS * row_bytes];
            let first_block = tile * TILE_ITEMS / BLOCK_ITEMS;
            let blocks = self.codes[first_block * block_bytes..].chunks_exact(block_bytes);
            for (block, codes) in blocks.take(TILE_ITEMS / BLOCK_ITEMS).enumerate() {
                let out = &mut out[block * BLOCK_ITEMS..];
                if self.avx2 {
                    // SAFETY: `avx2` is set only where the CPU has AVX2; `codes` holds a
                    // block's pairs, the tables GROUP_ROWS rows of them, and `out` reaches the
                    // last row's items at (GROUP_ROWS − 1)·TILE_ITEMS + BLOCK_ITEMS.
                    #[cfg(target_arch = "x86_64")]
                    unsafe {
                        lookup::avx2_block_sums(codes, group_tables, pairs, TILE_ITEMS, out)
                    };
                } else {
                    block_sums(codes, group_tables, pairs, TILE_ITEMS, out);
                }
            }
        });
    }
}

fn avx2() -> bool {
    #[cfg(target_arch = "x86_64")]
    return std::arch::is_x86_feature_detected!("avx2");
    #[cfg(not(target_arch = "x86_64"))]
    return false;
}

/// `out[r·stride + j]` = Σ over subspaces of row `r`'s table entry for item `j`'s code: the
/// kernel's definition, run where there is no AVX2 (and the reference the kernel is tested
/// against).
fn block_sums(codes: &[u8], tables: &[u8], pairs: usize, stride: usize, out: &mut [f32]) {
    for (r, table) in tables.chunks_exact(pairs * TABLE_BYTES).take(GROUP_ROWS).enumerate() {
        for j in 0..BLOCK_ITEMS {
            let mut sum = 0u32;
            for (codes, table) in codes.chunks_exact(PAIR_BYTES).zip(table.chunks_exact(TABLE_BYTES)) {
                for lane in 0..2 {
                    let code = codes[(j / 16) * 32 + lane * 16 + j % 16];
                    sum += u32::from(table[lane * 16 + code as usize]);
                }
            }
            out[r * stride + j] = sum as f32;
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod lookup {
    use std::arch::x86_64::*;

    use super::{GROUP_ROWS, PAIRS_PER_STEP, PAIR_BYTES, TABLE_BYTES};

    /// [`super::block_sums`] with byte shuffles: per pair of subspaces, one shuffle looks up 16
    /// items' codes in both subspaces' tables (one per 128-bit lane). Four pairs' lookups are
    /// added in bytes, then widened: summed in 16-bit lanes two bytes at a time, the even
    /// byte's sum being the lane's sum less 256 × the odd byte's. The two 128-bit lanes (the
    /// two subspaces of each pair) are added at the end.
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn avx2_block_sums(codes: &[u8], tables: &[u8], pairs: usize, stride: usize, out: &mut [f32]) {
        debug_assert!(
            pairs.is_multiple_of(PAIRS_PER_STEP)
                && codes.len() >= pairs * PAIR_BYTES
                && tables.len() >= GROUP_ROWS * pairs * TABLE_BYTES
                && out.len() >= (GROUP_ROWS - 1) * stride + 32
        );
        let (codes, tables) = (codes.as_ptr(), tables.as_ptr());
        // Per row: 16-bit sums of the first 16 items' bytes, then of their odd bytes; the same
        // for the last 16 items.
        let mut acc = [[_mm256_setzero_si256(); 4]; GROUP_ROWS];
        for step in (0..pairs).step_by(PAIRS_PER_STEP) {
            for (r, acc) in acc.iter_mut().enumerate() {
                let (mut first, mut last) = (_mm256_setzero_si256(), _mm256_setzero_si256());
                for p in step..step + PAIRS_PER_STEP {
                    let table = _mm256_loadu_si256(tables.add((r * pairs + p) * TABLE_BYTES).cast());
                    let pair = codes.add(p * PAIR_BYTES);
                    let (head, tail) = (_mm256_loadu_si256(pair.cast()), _mm256_loadu_si256(pair.add(32).cast()));
                    first = _mm256_add_epi8(first, _mm256_shuffle_epi8(table, head));
                    last = _mm256_add_epi8(last, _mm256_shuffle_epi8(table, tail));
                }
                acc[0] = _mm256_add_epi16(acc[0], first);
                acc[1] = _mm256_add_epi16(acc[1], _mm256_srli_epi16::<8>(first));
                acc[2] = _mm256_add_epi16(acc[2], last);
                acc[3] = _mm256_add_epi16(acc[3], _mm256_srli_epi16::<8>(last));
            }
        }
        for (r, acc) in acc.iter().enumerate() {
            for half in 0..2 {
                let (whole, odd) = (acc[2 * half], acc[2 * half + 1]);
                let even = _mm256_sub_epi16(whole, _mm256_slli_epi16::<8>(odd));
                let both = |v: __m256i| _mm_add_epi16(_mm256_castsi256_si128(v), _mm256_extracti128_si256::<1>(v));
                let (even, odd) = (both(even), both(odd));
                let to = out.as_mut_ptr().add(r * stride + half * 16);
                let first = _mm256_cvtepi32_ps(_mm256_cvtepu16_epi32(_mm_unpacklo_epi16(even, odd)));
                let second = _mm256_cvtepi32_ps(_mm256_cvtepu16_epi32(_mm_unpackhi_epi16(even, odd)));
                _mm256_storeu_ps(to, first);
                _mm256_storeu_ps(to.add(8), second);
            }
        }
    }
}

/// Lloyd's k-means with [`CENTROIDS`] centroids, started from evenly spaced points; a centroid
/// left without points keeps its place. Fewer points than centroids repeat.
fn k_means(points: &[[f32; SUBSPACE_DIMS]]) -> Vec<[f32; SUBSPACE_DIMS]> {
    if points.is_empty() {
        return vec![[0.0; SUBSPACE_DIMS]; CENTROIDS];
    }
    let mut centroids: Vec<[f32; SUBSPACE_DIMS]> =
        (0..CENTROIDS).map(|c| points[c * points.len() / CENTROIDS]).collect();
    for _ in 0..ITERATIONS {
        let mut sums = vec![[0f64; SUBSPACE_DIMS]; CENTROIDS];
        let mut counts = vec![0usize; CENTROIDS];
        for point in points {
            let c = nearest(&centroids, point);
            counts[c] += 1;
            for (sum, &value) in sums[c].iter_mut().zip(point) {
                *sum += f64::from(value);
            }
        }
        for ((centroid, sum), &count) in centroids.iter_mut().zip(&sums).zip(&counts) {
            if count > 0 {
                *centroid = std::array::from_fn(|d| (sum[d] / count as f64) as f32);
            }
        }
    }
    centroids
}

/// The centroid closest to `point` (squared distance; the first of equals).
fn nearest(centroids: &[[f32; SUBSPACE_DIMS]], point: &[f32; SUBSPACE_DIMS]) -> usize {
    let distance = |c: &[f32; SUBSPACE_DIMS]| -> f32 { c.iter().zip(point).map(|(a, b)| (a - b) * (a - b)).sum() };
    let mut best = (0, f32::INFINITY);
    for (index, centroid) in centroids.iter().enumerate() {
        let d = distance(centroid);
        if d < best.1 {
            best = (index, d);
        }
    }
    best.0
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    proptest! {
        /// The shuffle kernel sums what the plain loop sums, for any codes and tables: the
        /// 16-bit lanes hold every sum up to the widest table allowed.
        #[test]
        fn the_lookup_kernel_sums_like_the_plain_loop(
            steps in 1usize..=MAX_SUBSPACES / 2 / PAIRS_PER_STEP,
            seed in any::<u64>(),
            saturated in any::<bool>(),
        ) {
            use rand::{Rng, SeedableRng};
            prop_assume!(avx2());
            let pairs = steps * PAIRS_PER_STEP;
            let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
            let codes: Vec<u8> = (0..pairs * PAIR_BYTES).map(|_| rng.gen_range(0..CENTROIDS as u8)).collect();
            let tables: Vec<u8> = (0..GROUP_ROWS * pairs * TABLE_BYTES)
                .map(|_| if saturated { TABLE_MAX } else { rng.gen_range(0..=TABLE_MAX) })
                .collect();
            let stride = 40;
            let (mut plain, mut kernel) = (vec![0f32; GROUP_ROWS * stride], vec![0f32; GROUP_ROWS * stride]);
            block_sums(&codes, &tables, pairs, stride, &mut plain);
            // SAFETY: AVX2 checked above; the slices are as long as the kernel reads and writes.
            #[cfg(target_arch = "x86_64")]
            unsafe { lookup::avx2_block_sums(&codes, &tables, pairs, stride, &mut kernel) };
            prop_assert_eq!(plain, kernel);
        }
    }

    /// Codes round-trip: every item is coded with its nearest centroid in every subspace, and
    /// the codes of neighbouring items do not overwrite each other's nibbles.
    #[test]
    fn every_item_gets_its_nearest_centroid() {
        let (items, dim) = (1000, 7);
        let table: Vec<f32> = (0..items * dim)
            .map(|i| ((i * 7919) % 1013) as f32 / 100.0 - 5.0)
            .collect();
        let index = QuantizedItems::new(&table, dim).unwrap();
        assert_eq!(index.subspaces, 8);
        for item in 0..items {
            for subspace in 0..index.subspaces {
                let point: [f32; SUBSPACE_DIMS] = std::array::from_fn(|d| {
                    let k = subspace * SUBSPACE_DIMS + d;
                    if k < dim {
                        table[item * dim + k]
                    } else {
                        0.0
                    }
                });
                let code = index.codes[index.code_position(item, subspace)];
                assert_eq!(code as usize, nearest(index.subspace_centroids(subspace), &point));
            }
        }
    }
}
