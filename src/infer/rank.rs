//! Ranking: the best k items of the catalogue for each hidden state, and the best k entries of
//! any score matrix.
//!
//! On the host, the catalogue is scored a tile of items at a time and each tile is searched
//! while it is still in cache, so that the `[B, V]` score matrix is never written out: for a
//! million items and 64 users that matrix is 256 MB, and writing it, faulting its pages in and
//! reading it back for masking and top-k cost as much as the multiply itself (measured in
//! docs/BENCHMARKS.md, "Large catalogues"). On a GPU, memory bandwidth is plentiful and one
//! `topk` over the whole matrix is the fast way.
use std::cmp::Ordering;

use tch::{Device, Kind, Tensor};

use crate::model::input::{host_f32_view, to_host_f32};
use crate::model::mask_items;

/// The catalogue as ranking reads it: the model's item table (`[V, d]`, row `i` = item `i`), and
/// on the host a copy laid out for the scoring kernel.
pub struct Catalogue {
    table: Tensor,
    packed: Option<PackedItems>,
}

impl Catalogue {
    pub fn new(table: &Tensor) -> Self {
        let on_host = table.device() == Device::Cpu && table.kind() == Kind::Float;
        Self {
            packed: on_host.then(|| PackedItems::new(table)).flatten(),
            table: table.shallow_clone(),
        }
    }

    /// Bytes held besides the model's own table.
    fn extra_bytes(&self) -> usize {
        self.packed
            .as_ref()
            .map_or(0, |p| p.values.len() * std::mem::size_of::<f32>())
    }

    /// Per row, the best `ks[row]` items for `hidden` (`[B, d]`) by dot product: the padding
    /// item 0 and the row's `exclude` list left out, equal scores in item order.
    pub fn rank<E: AsRef<[i64]>>(&self, hidden: &Tensor, exclude: &[E], ks: &[usize]) -> Vec<Vec<(u32, f32)>> {
        let Some(packed) = &self.packed else {
            let scores = hidden.matmul(&self.table.tr());
            return top_k(&mask_items(scores, exclude), ks, None);
        };
        let excluded: Vec<Vec<i64>> = exclude
            .iter()
            .map(|row| {
                let mut row: Vec<i64> = std::iter::once(0).chain(row.as_ref().iter().copied()).collect();
                row.sort_unstable();
                row
            })
            .collect();
        let mut best: Vec<BestK> = ks.iter().map(|&k| BestK::new(k)).collect();
        packed.search(to_host_f32(hidden), &excluded, &mut best);
        best.into_iter()
            .map(|best| best.ranked(|column| column as u32))
            .collect()
    }
}

impl std::fmt::Display for Catalogue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.packed {
            Some(_) => write!(
                f,
                "exact, on the host's AVX-512 kernel (a packed copy of the table, {} MiB)",
                self.extra_bytes() >> 20
            ),
            None => write!(f, "exact, libtorch matmul and top-k on {:?}", self.table.device()),
        }
    }
}

/// f32 lanes of a 512-bit vector.
const LANES: usize = 16;
/// Vectors of items per block: each broadcast hidden value feeds this many multiply-adds.
const VECTORS: usize = 3;
/// Items per block of the packed table.
const BLOCK_ITEMS: usize = VECTORS * LANES;
/// Hidden states scored together against a block. 8 × 3 accumulators, 3 item vectors and a
/// broadcast fit the 32 vector registers of AVX-512, and a step of the kernel is then 11 loads
/// for 24 multiply-adds: bound by the two FMA ports, not by the loads (one item vector × 16
/// states was 17 loads for 16 multiply-adds and ran at half the FMA rate).
const ROWS: usize = 8;
/// Blocks scored before the scores are searched: a search call per 768 items, not per 48. A
/// group of states runs over the whole tile (384 KiB of table at d = 128, in L2 after the first
/// group) with its own 4 KiB in L1; block by block with every group, the states of 64 rows and a
/// block did not fit L1 together (B = 64 × 1M items: 177/166 → 152/153 ms, alternated).
const TILE_BLOCKS: usize = 16;
/// How far ahead of the block being scored its lines are fetched.
const PREFETCH_BLOCKS: usize = 2;

/// The item table in blocks of [`BLOCK_ITEMS`] items, each block dimension-major (block `b`,
/// dimension `k`, lane `j` holds item `BLOCK_ITEMS·b + j`'s `k`-th value; items past the end are
/// zero), so that the kernel reads a block's [`VECTORS`] vectors per dimension and multiplies
/// each by one broadcast hidden value.
/// MKL's GEMM on the plain table packs a copy of it on every call: for `[64, 128] × [128, 1M]`
/// that copy (512 MB read and written) and the `[64, 1M]` output were half the time.
struct PackedItems {
    dim: usize,
    items: usize,
    values: Vec<f32>,
}

impl PackedItems {
    /// `None` off x86 or without AVX-512, where libtorch's GEMM does the scoring.
    fn new(table: &Tensor) -> Option<Self> {
        if !avx512() {
            return None;
        }
        let (items, dim) = (table.size()[0] as usize, table.size()[1] as usize);
        // The model's table is read in place; a copy only where it is not contiguous.
        let copy;
        let plain = match host_f32_view(table) {
            Some(view) => view,
            None => {
                copy = to_host_f32(table);
                &copy
            }
        };
        let blocks = items.div_ceil(BLOCK_ITEMS);
        let mut values = vec![0f32; blocks * dim * BLOCK_ITEMS];
        for (item, row) in plain.chunks(dim.max(1)).enumerate() {
            let block = &mut values[(item / BLOCK_ITEMS) * dim * BLOCK_ITEMS..][..dim * BLOCK_ITEMS];
            for (k, &value) in row.iter().enumerate() {
                block[k * BLOCK_ITEMS + item % BLOCK_ITEMS] = value;
            }
        }
        Some(Self { dim, items, values })
    }

    /// Offers every item's score for each hidden state (`states`: rows × dim) to that row's
    /// `best`, a tile of blocks at a time, skipping the `excluded` items (sorted) of each row.
    fn search(&self, mut states: Vec<f32>, excluded: &[Vec<i64>], best: &mut [BestK]) {
        let (dim, rows) = (self.dim, best.len());
        let groups = rows.div_ceil(ROWS);
        // Rows padded to whole groups with zero states, whose scores nobody reads.
        states.resize(groups * ROWS * dim, 0.0);
        let tile = TILE_BLOCKS * BLOCK_ITEMS;
        let mut scores = vec![0f32; groups * ROWS * tile];
        for (index, panels) in self.values.chunks(TILE_BLOCKS * dim * BLOCK_ITEMS).enumerate() {
            let first = index * tile;
            let width = tile.min(self.items - first);
            for (group, group_states) in states.chunks_exact(ROWS * dim).enumerate() {
                for (block, panel) in panels.chunks_exact(dim * BLOCK_ITEMS).enumerate() {
                    let out = &mut scores[group * ROWS * tile + block * BLOCK_ITEMS..];
                    // SAFETY: `new` packs a table only where the CPU has AVX-512; the panel holds
                    // dim × BLOCK_ITEMS values, the states ROWS × dim, and `out` reaches row
                    // ROWS − 1's items at (ROWS − 1)·tile + BLOCK_ITEMS ≤ its length.
                    unsafe { block_scores(panel, group_states, dim, tile, out) };
                }
            }
            for ((best, excluded), row_scores) in best.iter_mut().zip(excluded).zip(scores.chunks(tile)) {
                best.offer(&row_scores[..width], first, excluded);
            }
        }
    }
}

fn avx512() -> bool {
    #[cfg(target_arch = "x86_64")]
    return std::arch::is_x86_feature_detected!("avx512f");
    #[cfg(not(target_arch = "x86_64"))]
    return false;
}

/// `out[r·stride + j]` = Σ_k `states[r·dim + k]` · `panel[k·BLOCK_ITEMS + j]`: one block of
/// items against [`ROWS`] hidden states, accumulators in registers. Each dimension's step also
/// asks for the same lines of the block [`PREFETCH_BLOCKS`] ahead: every step reads new cache
/// lines of the block, and with the hardware prefetchers alone a quarter of the kernel's samples
/// waited on them; asking for a whole block at once instead stalled on the line fill buffers.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn block_scores(panel: &[f32], states: &[f32], dim: usize, stride: usize, out: &mut [f32]) {
    use std::arch::x86_64::*;
    debug_assert!(
        panel.len() >= dim * BLOCK_ITEMS
            && states.len() >= ROWS * dim
            && out.len() >= (ROWS - 1) * stride + BLOCK_ITEMS
    );
    let (panel, states, out) = (panel.as_ptr(), states.as_ptr(), out.as_mut_ptr());
    let ahead = panel.wrapping_add(PREFETCH_BLOCKS * dim * BLOCK_ITEMS);
    let mut acc = [[_mm512_setzero_ps(); VECTORS]; ROWS];
    for k in 0..dim {
        let step = k * BLOCK_ITEMS;
        let mut items = [_mm512_setzero_ps(); VECTORS];
        for (v, items) in items.iter_mut().enumerate() {
            // A hint: it never faults, past the table's end too.
            _mm_prefetch::<_MM_HINT_T0>(ahead.wrapping_add(step + v * LANES).cast());
            *items = _mm512_loadu_ps(panel.add(step + v * LANES));
        }
        for (r, acc) in acc.iter_mut().enumerate() {
            let state = _mm512_set1_ps(*states.add(r * dim + k));
            for (acc, &items) in acc.iter_mut().zip(&items) {
                *acc = _mm512_fmadd_ps(state, items, *acc);
            }
        }
    }
    for (r, acc) in acc.iter().enumerate() {
        for (v, acc) in acc.iter().enumerate() {
            _mm512_storeu_ps(out.add(r * stride + v * LANES), *acc);
        }
    }
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn block_scores(_: &[f32], _: &[f32], _: usize, _: usize, _: &mut [f32]) {
    unreachable!("a table is packed only where the CPU has AVX-512")
}

/// Per row, the best `ks[row]` finite entries as (column, value) — or (`columns[row, column]`,
/// value) when the columns stand for items. On a GPU one `topk` for the whole group, and only
/// the winners are copied back; on the host the values are read where they are.
pub fn top_k(values: &Tensor, ks: &[usize], columns: Option<&Tensor>) -> Vec<Vec<(u32, f32)>> {
    if values.device() == Device::Cpu {
        return top_k_on_host(values, ks, columns);
    }
    let k_max = ks.iter().copied().max().unwrap_or(1).min(values.size()[1] as usize) as i64;
    let (top_values, top_index) = values.topk(k_max, 1, true, true);
    let top_index = columns.map_or(top_index.shallow_clone(), |c| c.gather(1, &top_index, false));
    // Winners leave the device as one int32 tensor (indices, then the f32 bits of the values):
    // one copy and one synchronisation instead of two.
    let packed = Tensor::cat(
        &[
            top_index.to_kind(Kind::Int),
            top_values.to_kind(Kind::Float).view_dtype(Kind::Int),
        ],
        0,
    );
    let packed = Vec::<i32>::try_from(packed.to_device(Device::Cpu).view(-1)).expect("winners");
    let (top_index, top_values) = packed.split_at(packed.len() / 2);
    let top_values: Vec<f32> = top_values.iter().map(|&bits| f32::from_bits(bits as u32)).collect();
    ks.iter()
        .enumerate()
        .map(|(row, &k)| {
            let start = row * k_max as usize;
            (start..start + k.min(k_max as usize))
                .filter(|&j| top_values[j].is_finite())
                .map(|j| (top_index[j] as u32, top_values[j]))
                .collect()
        })
        .collect()
}

/// [`top_k`] on the host, with the same search as the catalogue's slices. libtorch's CPU `topk`
/// keeps a heap of (value, index) pairs per row and cost ~6.5 µs per row of 1,683 items here, as
/// much as the rest of the ranking step.
fn top_k_on_host(values: &Tensor, ks: &[usize], columns: Option<&Tensor>) -> Vec<Vec<(u32, f32)>> {
    let values = values.to_kind(Kind::Float).contiguous();
    let width = values.size()[1] as usize;
    let columns = columns.map(|c| Vec::<i64>::try_from(c.reshape([-1])).expect("columns"));
    let all = host_f32_view(&values).expect("contiguous fp32 scores on the host");
    all.chunks(width.max(1))
        .zip(ks)
        .enumerate()
        .map(|(row, (scores, &k))| {
            let mut best = BestK::new(k);
            best.offer(scores, 0, &[]);
            best.ranked(|column| columns.as_ref().map_or(column as i64, |c| c[row * width + column]) as u32)
        })
        .collect()
}

/// Entries looked at together: the maximum of a block decides whether its entries are.
const BLOCK: usize = 64;

/// The best k finite entries of a row offered in pieces, columns rising. It keeps a floor, the
/// k-th best value so far, and looks into a block only when the block's maximum (one
/// vectorisable pass) is above it: after the first few blocks almost none is. Equal values keep
/// the lower column, so an entry equal to the floor, arriving later, can never enter.
struct BestK {
    k: usize,
    floor: f32,
    kept: Vec<(f32, usize)>,
}

impl BestK {
    fn new(k: usize) -> Self {
        Self {
            k,
            floor: f32::NEG_INFINITY,
            kept: Vec::new(),
        }
    }

    /// `values[j]` is column `first + j`; columns in `excluded` (sorted) are passed over.
    fn offer(&mut self, values: &[f32], first: usize, excluded: &[i64]) {
        if self.k == 0 {
            return;
        }
        for (index, block) in values.chunks(BLOCK).enumerate() {
            if block_max(block) <= self.floor {
                continue;
            }
            let start = first + index * BLOCK;
            for (offset, &value) in block.iter().enumerate() {
                let column = start + offset;
                if value > self.floor && value.is_finite() && excluded.binary_search(&(column as i64)).is_err() {
                    self.kept.push((value, column));
                }
            }
            if self.kept.len() >= (4 * self.k).max(BLOCK) {
                self.shrink();
            }
        }
    }

    fn shrink(&mut self) {
        // Kept values are finite; −0 and +0 are one score, ordered by column like any tie.
        self.kept
            .sort_unstable_by(|a, b| b.0.partial_cmp(&a.0).unwrap_or(Ordering::Equal).then(a.1.cmp(&b.1)));
        self.kept.truncate(self.k);
        if self.k > 0 && self.kept.len() == self.k {
            self.floor = self.kept[self.k - 1].0;
        }
    }

    /// Best first, as (`name(column)`, value).
    fn ranked(mut self, name: impl Fn(usize) -> u32) -> Vec<(u32, f32)> {
        self.shrink();
        self.kept
            .into_iter()
            .map(|(value, column)| (name(column), value))
            .collect()
    }
}

/// The largest of `values` (−inf for none or all NaN), with eight running maxima so that the
/// compiler may keep them in vector registers.
fn block_max(values: &[f32]) -> f32 {
    let mut maxima = [f32::NEG_INFINITY; 8];
    let chunks = values.chunks_exact(8);
    let tail = chunks
        .remainder()
        .iter()
        .fold(f32::NEG_INFINITY, |m, &v| if v > m { v } else { m });
    for chunk in chunks {
        for i in 0..8 {
            maxima[i] = if chunk[i] > maxima[i] { chunk[i] } else { maxima[i] };
        }
    }
    maxima.iter().fold(tail, |m, &v| if v > m { v } else { m })
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    proptest! {
        /// The host's top-k against the oracle of sorting every row: values from a few levels
        /// (ties), masked entries (−inf), NaN, rising and falling rows, any k and width, with
        /// and without a column map.
        #[test]
        fn the_host_top_k_is_the_best_k_finite_entries_by_value_then_column(
            rows in prop::collection::vec(
                (prop::collection::vec(prop::sample::select(vec![
                    -2.5f32, -1.0, 0.0, 0.25, 0.5, 3.0, f32::NEG_INFINITY, f32::NAN,
                ]), 1..400), any::<bool>(), 0usize..40),
                1..5,
            ),
            width in 1usize..400,
            mapped in any::<bool>(),
        ) {
            let rows: Vec<(Vec<f32>, usize)> = rows
                .into_iter()
                .map(|(levels, rising, k)| {
                    let row = (0..width)
                        .map(|j| levels[j % levels.len()] + if rising { j as f32 * 1e-3 } else { 0.0 })
                        .collect();
                    (row, k)
                })
                .collect();
            let flat: Vec<f32> = rows.iter().flat_map(|(row, _)| row.iter().copied()).collect();
            let values = Tensor::from_slice(&flat).view([rows.len() as i64, width as i64]);
            let ks: Vec<usize> = rows.iter().map(|(_, k)| *k).collect();
            let map: Vec<i64> = (0..flat.len() as i64).map(|i| 7 * i + 3).collect();
            let columns = Tensor::from_slice(&map).view([rows.len() as i64, width as i64]);
            let got = top_k(&values, &ks, mapped.then_some(&columns));
            for (r, ((row, k), got)) in rows.iter().zip(&got).enumerate() {
                let mut oracle: Vec<(f32, usize)> =
                    row.iter().enumerate().filter(|(_, v)| v.is_finite()).map(|(j, &v)| (v, j)).collect();
                oracle.sort_by(|a, b| b.0.partial_cmp(&a.0).unwrap().then(a.1.cmp(&b.1)));
                let oracle: Vec<(u32, f32)> = oracle
                    .into_iter()
                    .take(*k)
                    .map(|(v, j)| (if mapped { map[r * width + j] } else { j as i64 } as u32, v))
                    .collect();
                prop_assert_eq!(got, &oracle);
            }
        }

        /// Ranking a catalogue tile by tile gives what scoring it whole, masking and sorting
        /// give (the oracle): catalogues smaller and larger than a tile, whole and partial groups
        /// of states, rounded embeddings so that equal scores occur, random exclusions
        /// (duplicates and the padding item among them) and any k.
        #[test]
        fn the_catalogue_ranked_tile_by_tile_is_the_whole_catalogue_sorted(
            items in 2i64..20_000,
            dim in 1i64..24,
            rows in 1usize..20,
            seed in any::<i64>(),
            k in 0usize..30,
            excluded in prop::collection::vec(prop::collection::vec(0i64..20_000, 0..40), 20),
        ) {
            tch::manual_seed(seed);
            // Quarter steps: products and sums of a few of them are exact in f32, so ties are real.
            let table = (Tensor::randn([items, dim], (Kind::Float, Device::Cpu)) * 2.0).round() / 4.0;
            let hidden = (Tensor::randn([rows as i64, dim], (Kind::Float, Device::Cpu)) * 2.0).round() / 4.0;
            let exclude: Vec<Vec<i64>> = excluded[..rows].iter()
                .map(|row| row.iter().map(|&i| i % items).collect())
                .collect();
            let got = Catalogue::new(&table).rank(&hidden, &exclude, &vec![k; rows]);
            let scores = Vec::<f32>::try_from(hidden.matmul(&table.tr()).reshape([-1])).unwrap();
            for (row, got) in got.iter().enumerate() {
                let mut oracle: Vec<(f32, usize)> = (1..items as usize)
                    .filter(|item| !exclude[row].contains(&(*item as i64)))
                    .map(|item| (scores[row * items as usize + item], item))
                    .collect();
                oracle.sort_by(|a, b| b.0.partial_cmp(&a.0).unwrap().then(a.1.cmp(&b.1)));
                let oracle: Vec<(u32, f32)> = oracle.into_iter().take(k).map(|(v, i)| (i as u32, v)).collect();
                prop_assert_eq!(got, &oracle);
            }
        }
    }
}
