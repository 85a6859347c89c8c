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
use std::sync::atomic::{AtomicU64, Ordering as AtomicOrdering};

use tch::{Device, Kind, Tensor};

use crate::model::input::{host_f32_view, to_host_f32};
use crate::model::mask_items;

mod exact;
mod quantized;

use exact::{PackedItems, Storage};
use quantized::QuantizedItems;

/// Items scored before the scores are searched: a search call per 768 items, not per block. A
/// group of states runs over the whole tile (384 KiB of table at d = 128, in L2 after the first
/// group) with its own 4 KiB in L1; block by block with every group, the states of 64 rows and a
/// block did not fit L1 together (AVX-512, B = 64 × 1M items: 177/166 → 152/153 ms, alternated).
const TILE_ITEMS: usize = 768;

/// How a catalogue is ranked on the host.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Retrieval {
    /// Every item scored exactly.
    Exact,
    /// Every item scored by a cheaper first stage; the best `shortlist` of each row (at least
    /// k) are then scored exactly and ranked. With a rounded copy (int8, bf16) the answer is
    /// the exact one: a row whose shortlist the rounding's error bound does not settle gets a
    /// second scan for every item that could still reach its best ([`Catalogue::unsettled_rows`]
    /// counts them).
    Shortlist { scan: Scan, shortlist: usize },
}

/// The first stage of [`Retrieval::Shortlist`]: what every item is scored from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Scan {
    /// 4-bit product-quantization codes (an eighth of the fp32 copy's bytes at d = 128).
    #[value(name = "approximate")]
    ProductQuantized,
    /// A bf16 copy of the table (half the fp32 copy's bytes).
    Bf16,
    /// An int8 copy with a scale per item (a quarter).
    Int8,
}

impl std::fmt::Display for Scan {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::ProductQuantized => "approximate",
            Self::Bf16 => "bf16",
            Self::Int8 => "int8",
        })
    }
}

/// The flags that choose a [`Retrieval`], shared by `xsrec serve` and the benches.
#[derive(Debug, Clone, clap::Args)]
pub struct RetrievalArgs {
    /// How the host ranks the catalogue: `exact` scores every item from a packed fp32 copy of
    /// the table. The others score every item from a smaller copy and score the best
    /// `--shortlist` exactly, for catalogues of a few hundred thousand items and more:
    /// `approximate` from 4-bit product-quantization codes (64 bytes per item at d = 128, built
    /// at model load; approximate), `int8` from an int8 copy with a scale per item (a quarter of
    /// the fp32 copy), `bf16` from a bf16 copy (half). int8 and bf16 answer exactly as `exact`:
    /// their rounding has a known bound, and a request whose shortlist it cannot prove complete
    /// gets a second scan for every item that could still reach its best. Recall, speed and
    /// bytes in docs/BENCHMARKS.md. A GPU ranks exactly.
    #[arg(long, env = "XSREC_RETRIEVAL", value_enum, default_value = "exact")]
    pub retrieval: RetrievalMode,
    /// Items per request that a first stage (`approximate`, `int8`, `bf16`) passes on to exact
    /// scoring (at least k).
    #[arg(long, env = "XSREC_SHORTLIST", default_value_t = 1000)]
    pub shortlist: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum RetrievalMode {
    Exact,
    Approximate,
    Int8,
    Bf16,
}

impl RetrievalMode {
    /// The first stage this mode scans with; `None` for exact.
    pub fn scan(self) -> Option<Scan> {
        match self {
            Self::Exact => None,
            Self::Approximate => Some(Scan::ProductQuantized),
            Self::Int8 => Some(Scan::Int8),
            Self::Bf16 => Some(Scan::Bf16),
        }
    }
}

impl RetrievalArgs {
    pub fn retrieval(&self) -> Retrieval {
        match self.retrieval.scan() {
            None => Retrieval::Exact,
            Some(scan) => Retrieval::Shortlist {
                scan,
                shortlist: self.shortlist,
            },
        }
    }
}

/// The catalogue as ranking reads it: the model's item table (`[V, d]`, row `i` = item `i`), and
/// on the host a copy laid out for the scoring kernel, or a first stage's smaller copy.
pub struct Catalogue {
    /// The model's table, or for a bf16 model with a first stage on the host, its values in f32
    /// (what the shortlist is re-scored from).
    table: Tensor,
    /// Bytes of that f32 copy, when one was made.
    widened_bytes: usize,
    search: Search,
    /// Rows whose rounded first-stage shortlist could not be proven exact (a second scan, or
    /// near f32's range the whole table, ranked them).
    unsettled_rows: AtomicU64,
}

enum Search {
    /// libtorch's matmul and top-k (a GPU, or a CPU without a kernel here).
    Libtorch,
    Exact(PackedItems),
    Shortlist {
        first: FirstStage,
        shortlist: usize,
    },
}

/// What picks a shortlist: both offer every item's approximate score to each row's [`BestK`].
enum FirstStage {
    Quantized(QuantizedItems),
    Packed(PackedItems),
}

impl FirstStage {
    fn new(table: &Tensor, scan: Scan) -> Option<Self> {
        match scan {
            Scan::ProductQuantized => {
                let dim = table.size()[1] as usize;
                QuantizedItems::new(&host_table(table), dim).map(Self::Quantized)
            }
            Scan::Bf16 => PackedItems::new(table, Storage::Bf16).map(Self::Packed),
            Scan::Int8 => PackedItems::new(table, Storage::Int8).map(Self::Packed),
        }
    }

    fn search(&self, states: &[f32], excluded: &[Vec<i64>], best: &mut [BestK]) {
        match self {
            Self::Quantized(index) => index.search(states, excluded, best),
            Self::Packed(packed) => packed.search(states, excluded, best),
        }
    }

    fn bytes(&self) -> usize {
        match self {
            Self::Quantized(index) => index.bytes(),
            Self::Packed(packed) => packed.bytes(),
        }
    }

    /// How far this stage's score of any item can be from its exact score, for `state`: known
    /// for a rounded copy of the table (int8, bf16), not for product-quantization codes.
    fn error_bound(&self, state: &[f32]) -> Option<f64> {
        match self {
            Self::Quantized(_) => None,
            Self::Packed(packed) => Some(packed.error_bound(state)),
        }
    }
}

/// The k-th best exact score of a re-ranked shortlist, where it holds k.
fn kth_exact(ranked: &[(u32, f32)], k: usize) -> Option<f32> {
    ranked
        .get(k.max(1) - 1)
        .filter(|_| ranked.len() >= k)
        .map(|&(_, kth)| kth)
}

/// The first-stage score below which an item cannot be among a row's exact best `k`, given a
/// shortlist's re-ranked best (`ranked`): the exact best all score at least its k-th, so at
/// least that less `bound` in the first stage; −∞ where it has fewer than k. Lowered by a
/// thousandth of the bound so that f32's rounding never raises it.
fn must_reach(ranked: &[(u32, f32)], k: usize, bound: f64) -> f32 {
    kth_exact(ranked, k).map_or(f32::NEG_INFINITY, |kth| (f64::from(kth) - bound * 1.001) as f32)
}

/// Whether a re-ranked shortlist is provably the exact best `k`: every item left out scored at
/// most `floor` in the first stage, so at most `floor + bound` exactly, and that is below the
/// k-th exact score (strictly: an equal score could still win on item order).
fn settled(ranked: &[(u32, f32)], k: usize, floor: f32, bound: f64) -> bool {
    floor == f32::NEG_INFINITY // nothing was left out
        || kth_exact(ranked, k).is_some_and(|kth| f64::from(floor) + bound < f64::from(kth))
}

impl Catalogue {
    pub fn new(table: &Tensor, retrieval: Retrieval) -> Self {
        // A bf16 model on the host (an encoder on the CPU's bf16 units) is ranked by the host
        // kernels from its table's values widened to f32: its scores are then the exact dot
        // products of those values, where libtorch's bf16 matmul rounds every score to 8 bits
        // (near-ties fall by chance) and, over a million items, took 240 ms a batch of 32
        // against 30 ms for the int8 stage (docs/BENCHMARKS.md).
        let host_values = match (table.device(), table.kind()) {
            (Device::Cpu, Kind::Float) => Some(table.shallow_clone()),
            (Device::Cpu, Kind::BFloat16) => Some(table.to_kind(Kind::Float)),
            _ => None,
        };
        let search = host_values.as_ref().and_then(|values| match retrieval {
            Retrieval::Exact => PackedItems::new(values, Storage::Fp32).map(Search::Exact),
            Retrieval::Shortlist { scan, shortlist } => {
                FirstStage::new(values, scan).map(|first| Search::Shortlist { first, shortlist })
            }
        });
        // Only a shortlist reads the table itself (to re-score); the exact kernel has its copy.
        let (table, widened_bytes) = match (&search, host_values) {
            (Some(Search::Shortlist { .. }), Some(values)) if table.kind() != Kind::Float => {
                let bytes = values.numel() * std::mem::size_of::<f32>();
                (values, bytes)
            }
            _ => (table.shallow_clone(), 0),
        };
        Self {
            search: search.unwrap_or(Search::Libtorch),
            table,
            widened_bytes,
            unsettled_rows: AtomicU64::new(0),
        }
    }

    /// The precision of this catalogue's scores: f32 on the host kernels (a bf16 model's values
    /// widened), the table's own on libtorch's matmul.
    pub fn score_kind(&self) -> Kind {
        match self.search {
            Search::Libtorch => self.table.kind(),
            _ => Kind::Float,
        }
    }

    /// Rows so far whose int8 or bf16 shortlist could not be proven exact, and which were
    /// therefore ranked from a second scan (or the whole table).
    pub fn unsettled_rows(&self) -> u64 {
        self.unsettled_rows.load(AtomicOrdering::Relaxed)
    }

    /// Per row, the best `ks[row]` items for `hidden` (`[B, d]`) by dot product: the padding
    /// item 0 and the row's `exclude` list left out, equal scores in item order. With a first
    /// stage, the best of its shortlist, with exact scores.
    pub fn rank<E: AsRef<[i64]>>(&self, hidden: &Tensor, exclude: &[E], ks: &[usize]) -> Vec<Vec<(u32, f32)>> {
        if let Search::Libtorch = self.search {
            let scores = hidden.matmul(&self.table.tr());
            return top_k(&mask_items(scores, exclude), ks, None);
        }
        let excluded: Vec<Vec<i64>> = exclude
            .iter()
            .map(|row| {
                let mut row: Vec<i64> = std::iter::once(0).chain(row.as_ref().iter().copied()).collect();
                row.sort_unstable();
                row
            })
            .collect();
        let states = to_host_f32(hidden);
        match &self.search {
            Search::Exact(packed) => {
                let mut best: Vec<BestK> = ks.iter().map(|&k| BestK::new(k)).collect();
                packed.search(&states, &excluded, &mut best);
                best.into_iter()
                    .map(|best| best.ranked(|column| column as u32))
                    .collect()
            }
            Search::Shortlist { first, shortlist } => {
                let mut best: Vec<BestK> = ks.iter().map(|&k| BestK::new(k.max(*shortlist))).collect();
                first.search(&states, &excluded, &mut best);
                let table = host_table(&self.table);
                let dim = self.table.size()[1] as usize;
                let mut ranked = Vec::with_capacity(ks.len());
                // Rows the error bound does not settle, and the first-stage score every item of
                // their exact best must reach.
                let mut unsettled: Vec<(usize, f32)> = Vec::new();
                for (row, ((best, state), &k)) in best
                    .into_iter()
                    .zip(states.chunks_exact(dim.max(1)))
                    .zip(ks)
                    .enumerate()
                {
                    let (shortlist, floor) = best.into_columns_and_floor();
                    let mut row_ranked = rerank(&table, state, shortlist, k);
                    match first.error_bound(state) {
                        // Scores near f32's range (or a NaN state): an overflowed first-stage
                        // score is dropped, so the whole table decides.
                        Some(bound) if !bound.is_finite() => {
                            self.unsettled_rows.fetch_add(1, AtomicOrdering::Relaxed);
                            let items = self.table.size()[0] as usize;
                            let every = (0..items).filter(|&item| excluded[row].binary_search(&(item as i64)).is_err());
                            row_ranked = rerank(&table, state, every.collect(), k);
                        }
                        Some(bound) if !settled(&row_ranked, k, floor, bound) => {
                            unsettled.push((row, must_reach(&row_ranked, k, bound)));
                        }
                        _ => {}
                    }
                    ranked.push(row_ranked);
                }
                if !unsettled.is_empty() {
                    self.unsettled_rows
                        .fetch_add(unsettled.len() as u64, AtomicOrdering::Relaxed);
                    // One more scan for them all, keeping every item that can reach the row's
                    // exact best: the exact k-th best of its shortlist, less the bound.
                    let row_states: Vec<f32> = unsettled
                        .iter()
                        .flat_map(|&(row, _)| &states[row * dim..][..dim])
                        .copied()
                        .collect();
                    let row_excluded: Vec<Vec<i64>> = unsettled.iter().map(|&(row, _)| excluded[row].clone()).collect();
                    let mut reaching: Vec<BestK> = unsettled.iter().map(|&(_, least)| BestK::above(least)).collect();
                    first.search(&row_states, &row_excluded, &mut reaching);
                    for ((row, _), reaching) in unsettled.into_iter().zip(reaching) {
                        let state = &states[row * dim..][..dim];
                        ranked[row] = rerank(&table, state, reaching.into_columns_and_floor().0, ks[row]);
                    }
                }
                ranked
            }
            Search::Libtorch => unreachable!("answered above"),
        }
    }

    /// Bytes held besides the model's own table.
    pub fn extra_bytes(&self) -> usize {
        self.widened_bytes
            + match &self.search {
                Search::Libtorch => 0,
                Search::Exact(packed) => packed.bytes(),
                Search::Shortlist { first, .. } => first.bytes(),
            }
    }
}

/// The model's table on the host as f32, in place where it is contiguous.
fn host_table(table: &Tensor) -> std::borrow::Cow<'_, [f32]> {
    match host_f32_view(table) {
        Some(view) => std::borrow::Cow::Borrowed(view),
        None => std::borrow::Cow::Owned(to_host_f32(table)),
    }
}

/// The best `k` of a shortlist of items by exact score (best first, equal scores in item order).
fn rerank(table: &[f32], state: &[f32], shortlist: Vec<usize>, k: usize) -> Vec<(u32, f32)> {
    let dim = state.len();
    let mut best = BestK::new(k);
    best.kept = shortlist
        .into_iter()
        .map(|item| (exact_dot(state, &table[item * dim..][..dim]), item))
        .filter(|(score, _)| score.is_finite())
        .collect();
    best.ranked(|item| item as u32)
}

/// A dot product summed in the exact kernels' order (one fused multiply-add per dimension, from
/// the first), so that re-ranked scores equal the exact path's bit for bit.
fn exact_dot(state: &[f32], item: &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("fma") {
        // SAFETY: the CPU has FMA.
        return unsafe { fused_dot(state, item) };
    }
    state.iter().zip(item).fold(0.0, |acc, (&s, &x)| s.mul_add(x, acc))
}

/// [`exact_dot`] compiled for FMA, where `mul_add` is one instruction and not a library call.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "fma")]
unsafe fn fused_dot(state: &[f32], item: &[f32]) -> f32 {
    state.iter().zip(item).fold(0.0, |acc, (&s, &x)| s.mul_add(x, acc))
}

impl std::fmt::Display for Catalogue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let extra = self.extra_bytes() >> 20;
        match &self.search {
            Search::Libtorch => write!(f, "exact, libtorch matmul and top-k on {:?}", self.table.device()),
            Search::Exact(packed) => write!(
                f,
                "exact, on the host's {} kernel (a packed copy of the table, {extra} MiB)",
                packed.kernel_name()
            ),
            Search::Shortlist { first, shortlist } => {
                let scan = match first {
                    FirstStage::Quantized(_) => "4-bit product-quantization codes".to_owned(),
                    FirstStage::Packed(packed) => {
                        format!(
                            "a {} copy of the table on the {} kernel",
                            packed.storage_name(),
                            packed.kernel_name()
                        )
                    }
                };
                write!(
                    f,
                    "{scan} ({extra} MiB) pick {shortlist} items per request for exact scoring"
                )
            }
        }
    }
}

/// Offers the scores of `items` items to each row's `best`, a tile of [`TILE_ITEMS`] at a time,
/// skipping the `excluded` items (sorted) of each row. `score(tile, group, out)` writes the tile's
/// scores for rows `group·group_rows ..` into `out`, row after row, [`TILE_ITEMS`] apart.
fn search_tiles(
    items: usize,
    group_rows: usize,
    excluded: &[Vec<i64>],
    best: &mut [BestK],
    mut score: impl FnMut(usize, usize, &mut [f32]),
) {
    let groups = best.len().div_ceil(group_rows);
    let mut scores = vec![0f32; groups * group_rows * TILE_ITEMS];
    for tile in 0..items.div_ceil(TILE_ITEMS) {
        let first = tile * TILE_ITEMS;
        let width = TILE_ITEMS.min(items - first);
        for (group, out) in scores.chunks_exact_mut(group_rows * TILE_ITEMS).enumerate() {
            score(tile, group, out);
        }
        for ((best, excluded), row_scores) in best.iter_mut().zip(excluded).zip(scores.chunks(TILE_ITEMS)) {
            best.offer(&row_scores[..width], first, excluded);
        }
    }
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
/// k-th best value so far, and looks only at the entries above it: after the first few blocks
/// almost none is. Equal values keep
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

    /// Keeps every column offered above `floor`, however many.
    fn above(floor: f32) -> Self {
        Self {
            k: usize::MAX / 8, // never reached, and 4·k does not overflow
            floor,
            kept: Vec::new(),
        }
    }

    /// `values[j]` is column `first + j`; columns in `excluded` (sorted) are passed over.
    fn offer(&mut self, values: &[f32], first: usize, excluded: &[i64]) {
        if self.k == 0 {
            return;
        }
        for (index, block) in values.chunks(BLOCK).enumerate() {
            let mut above = above_mask(block, self.floor);
            let start = first + index * BLOCK;
            while above != 0 {
                let offset = above.trailing_zeros() as usize;
                above &= above - 1;
                let (value, column) = (block[offset], start + offset);
                if value.is_finite() && excluded.binary_search(&(column as i64)).is_err() {
                    self.kept.push((value, column));
                }
            }
            if self.kept.len() >= (4 * self.k).max(BLOCK) {
                self.shrink();
            }
        }
    }

    /// Keeps the best k, unordered: a selection, linear in what is kept, where a sort was
    /// n log n (a shortlist of 3,000 spent more time sorting than scanning the catalogue).
    fn shrink(&mut self) {
        if self.k == 0 {
            self.kept.clear();
        }
        if self.k == 0 || self.kept.len() < self.k {
            return;
        }
        let (_, kth, _) = self.kept.select_nth_unstable_by(self.k - 1, best_first);
        self.floor = kth.0;
        self.kept.truncate(self.k);
    }

    /// The columns kept, in no order, and the floor: every column offered and not kept had a
    /// value at most this (−∞ where none was left out).
    fn into_columns_and_floor(mut self) -> (Vec<usize>, f32) {
        self.shrink();
        let floor = self.floor;
        (self.kept.into_iter().map(|(_, column)| column).collect(), floor)
    }

    /// Best first, as (`name(column)`, value).
    fn ranked(mut self, name: impl Fn(usize) -> u32) -> Vec<(u32, f32)> {
        self.shrink();
        self.kept.sort_unstable_by(best_first);
        self.kept
            .into_iter()
            .map(|(value, column)| (name(column), value))
            .collect()
    }
}

/// Higher value first, then lower column. Kept values are finite; −0 and +0 are one score,
/// ordered by column like any tie.
fn best_first(a: &(f32, usize), b: &(f32, usize)) -> Ordering {
    b.0.partial_cmp(&a.0).unwrap_or(Ordering::Equal).then(a.1.cmp(&b.1))
}

/// Bit `j` set where `values[j]` (up to [`BLOCK`] of them) is above `floor`, NaN never: one
/// vectorisable pass, and the entries above the floor, few once it has risen, found by their
/// bits instead of one comparison each (a shortlist of 1,000 spent half the scan's time in
/// them).
fn above_mask(values: &[f32], floor: f32) -> u64 {
    // The crate is built for baseline x86-64, where this loop compiles to 4-wide SSE compares:
    // with the VNNI int8 scan it took a third of the ranking's time. Whole blocks take the
    // widest compare the CPU has.
    #[cfg(target_arch = "x86_64")]
    if values.len() == BLOCK {
        if std::arch::is_x86_feature_detected!("avx512f") {
            // SAFETY: the CPU runs AVX-512F, and the block holds BLOCK values.
            return unsafe { wide_compare::above_mask_avx512(values, floor) };
        }
        if std::arch::is_x86_feature_detected!("avx") {
            // SAFETY: the CPU runs AVX, and the block holds BLOCK values.
            return unsafe { wide_compare::above_mask_avx(values, floor) };
        }
    }
    let mut mask = 0u64;
    for (index, chunk) in values.chunks(8).enumerate() {
        let bits = chunk
            .iter()
            .enumerate()
            .fold(0u64, |bits, (j, &v)| bits | (u64::from(v > floor) << j));
        mask |= bits << (8 * index);
    }
    mask
}

/// [`above_mask`] of a whole block by vector compares (ordered: NaN is never above).
#[cfg(target_arch = "x86_64")]
mod wide_compare {
    use std::arch::x86_64::*;

    use super::BLOCK;

    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn above_mask_avx512(values: &[f32], floor: f32) -> u64 {
        let floor = _mm512_set1_ps(floor);
        let mut mask = 0u64;
        for part in 0..BLOCK / 16 {
            let v = _mm512_loadu_ps(values.as_ptr().add(16 * part));
            mask |= u64::from(_mm512_cmp_ps_mask::<_CMP_GT_OQ>(v, floor)) << (16 * part);
        }
        mask
    }

    #[target_feature(enable = "avx")]
    pub(super) unsafe fn above_mask_avx(values: &[f32], floor: f32) -> u64 {
        let floor = _mm256_set1_ps(floor);
        let mut mask = 0u64;
        for part in 0..BLOCK / 8 {
            let v = _mm256_loadu_ps(values.as_ptr().add(8 * part));
            let bits = _mm256_movemask_ps(_mm256_cmp_ps::<_CMP_GT_OQ>(v, floor)) as u32;
            mask |= u64::from(bits) << (8 * part);
        }
        mask
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    proptest! {
        /// A block's mask of entries above the floor, however computed, is the plain comparison
        /// (NaN and equal values never above), for whole blocks and partial ones.
        #[test]
        fn the_above_mask_is_the_plain_comparison(
            values in prop::collection::vec(prop_oneof![
                8 => -4.0f32..4.0,
                1 => Just(f32::NAN),
                1 => Just(f32::INFINITY),
                1 => Just(f32::NEG_INFINITY),
                1 => Just(0.5f32),
            ], BLOCK),
            cut in 1..BLOCK,
            floor in prop_oneof![-4.0f32..4.0, Just(0.5f32), Just(f32::NEG_INFINITY)],
        ) {
            for values in [&values[..], &values[..cut]] {
                let plain = values.iter().enumerate().fold(0u64, |mask, (j, &v)| mask | (u64::from(v > floor) << j));
                prop_assert_eq!(above_mask(values, floor), plain);
            }
        }

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
        /// (duplicates and the padding item among them) and any k. Every first stage whose
        /// shortlist holds the whole catalogue must give the same, and so must a bf16 model
        /// (table and states in bf16, their dot products exact in f32).
        #[test]
        fn the_catalogue_ranked_tile_by_tile_is_the_whole_catalogue_sorted(
            bf16_model in any::<bool>(),
            items in 2i64..20_000,
            dim in 1i64..24,
            rows in 1usize..20,
            seed in any::<i64>(),
            k in 0usize..30,
            excluded in prop::collection::vec(prop::collection::vec(0i64..20_000, 0..40), 20),
            scan in prop::option::of(prop::sample::select(vec![Scan::ProductQuantized, Scan::Bf16, Scan::Int8])),
        ) {
            let retrieval = match scan {
                Some(scan) => Retrieval::Shortlist { scan, shortlist: items as usize },
                None => Retrieval::Exact,
            };
            tch::manual_seed(seed);
            // Quarter steps: products and sums of a few of them are exact in f32, so ties are real.
            // A bf16 model's values take 1/64 steps: exact in bf16, their sums need f32.
            let steps = if bf16_model { 64.0 } else { 4.0 };
            let rounded = |shape: [i64; 2]| (Tensor::randn(shape, (Kind::Float, Device::Cpu)) * (steps / 2.0)).round() / steps;
            let (table, hidden) = (rounded([items, dim]), rounded([rows as i64, dim]));
            let exclude: Vec<Vec<i64>> = excluded[..rows].iter()
                .map(|row| row.iter().map(|&i| i % items).collect())
                .collect();
            let model_kind = if bf16_model { Kind::BFloat16 } else { Kind::Float };
            let got = Catalogue::new(&table.to_kind(model_kind), retrieval)
                .rank(&hidden.to_kind(model_kind), &exclude, &vec![k; rows]);
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

    /// Every first stage against exact scoring (the oracle) on random Gaussian catalogues (the
    /// hardest case for an index: no clusters), randomised in size, width, seed and k: recall@k
    /// of the shortlist's re-ranked best stays above 0.95 with a shortlist of 2% of the items,
    /// and every returned score is the item's exact score.
    #[test]
    fn every_first_stage_recalls_the_exact_best_items() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(13);
        for case in 0..6 {
            let items = rng.gen_range(20_000i64..60_000);
            let dim = [16i64, 32, 48, 64, 96, 128][case];
            let k = rng.gen_range(1usize..=20);
            tch::manual_seed(rng.gen());
            let table = Tensor::randn([items, dim], (Kind::Float, Device::Cpu));
            let hidden = Tensor::randn([40, dim], (Kind::Float, Device::Cpu));
            let exclude: Vec<Vec<i64>> = (0..40)
                .map(|r| (0..30).map(|i| 1 + (r * 97 + i * 13) % (items - 1)).collect())
                .collect();
            let shortlist = items as usize / 50;
            let exact = Catalogue::new(&table, Retrieval::Exact).rank(&hidden, &exclude, &[k; 40]);
            let scores = Vec::<f32>::try_from(hidden.matmul(&table.tr()).reshape([-1])).unwrap();
            for scan in [Scan::ProductQuantized, Scan::Bf16, Scan::Int8] {
                let retrieval = Retrieval::Shortlist { scan, shortlist };
                let shortlisted = Catalogue::new(&table, retrieval).rank(&hidden, &exclude, &[k; 40]);
                let mut found = 0;
                for (row, (exact, shortlisted)) in exact.iter().zip(&shortlisted).enumerate() {
                    assert_eq!(shortlisted.len(), k);
                    for &(item, score) in shortlisted {
                        let oracle = scores[row * items as usize + item as usize];
                        assert!(
                            (score - oracle).abs() <= 1e-4 * oracle.abs().max(1.0),
                            "{scan}: {score} vs {oracle}"
                        );
                        assert!(!exclude[row].contains(&i64::from(item)) && item != 0);
                    }
                    found += shortlisted
                        .iter()
                        .filter(|(item, _)| exact.iter().any(|(e, _)| e == item))
                        .count();
                }
                let recall = found as f64 / (40 * k) as f64;
                assert!(recall >= 0.95, "{scan}, {items} items × {dim}, k {k}: recall {recall}");
            }
        }
    }

    /// The rounded first stages (int8, bf16) rank exactly, with the exact path as the oracle:
    /// random Gaussian catalogues randomised in size, width, k and shortlist (down to k itself),
    /// and catalogues whose best items are near-copies of one vector, closer than the rounding
    /// can tell apart, so that rows need the second scan. Items and scores equal
    /// the exact path's bit for bit; with a shortlist of 2% of a Gaussian catalogue the error
    /// bound settles every row but (at most) the one whose state is scaled to near f32's range.
    #[test]
    fn rounded_first_stages_rank_exactly() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(29);
        let (mut unsettled_near_copies, mut unsettled_wide_gaussian) = (0, 0);
        for case in 0..8 {
            let items = rng.gen_range(2_000i64..8_000);
            let dim = [8i64, 16, 33, 64, 128][rng.gen_range(0..5)];
            let k = rng.gen_range(1usize..=15);
            let near_copies = case % 2 == 1;
            tch::manual_seed(rng.gen());
            let mut table = Tensor::randn([items, dim], (Kind::Float, Device::Cpu));
            let mut hidden = Tensor::randn([24, dim], (Kind::Float, Device::Cpu));
            if near_copies {
                let base = Tensor::randn([1, dim], (Kind::Float, Device::Cpu));
                let copies = &base * 3.0 + Tensor::randn([200, dim], (Kind::Float, Device::Cpu)) * 1e-4;
                table = Tensor::cat(&[table.narrow(0, 0, 1), copies, table.narrow(0, 201, items - 201)], 0);
                hidden = &base + hidden * 0.1;
            } else {
                // A state so large that the bound reaches f32's range: that row takes the whole
                // table at once.
                let _ = hidden.get(0).g_mul_scalar_(1e36);
            }
            let exclude: Vec<Vec<i64>> = (0..24)
                .map(|r| (0..r % 5).map(|i| 1 + (r * 31 + i * 7) % (items - 1)).collect())
                .collect();
            let exact = Catalogue::new(&table, Retrieval::Exact).rank(&hidden, &exclude, &[k; 24]);
            for scan in [Scan::Bf16, Scan::Int8] {
                for shortlist in [k, 2 * k, items as usize / 50] {
                    let catalogue = Catalogue::new(&table, Retrieval::Shortlist { scan, shortlist });
                    let got = catalogue.rank(&hidden, &exclude, &[k; 24]);
                    assert_eq!(got, exact, "{scan}, {items} × {dim}, k {k}, shortlist {shortlist}");
                    if near_copies {
                        unsettled_near_copies += catalogue.unsettled_rows();
                    } else if shortlist == items as usize / 50 {
                        unsettled_wide_gaussian += catalogue.unsettled_rows();
                    }
                }
            }
        }
        assert!(
            unsettled_near_copies > 0,
            "the near-copies never needed the second scan"
        );
        assert!(
            unsettled_wide_gaussian <= 4 * 2,
            "only the huge row of a Gaussian case and scan may be unsettled"
        );
    }

    /// Where the int8 kernel rounds the state too (VNNI's byte products), the state's rounding
    /// is in the error bound: per random state (one large value, so that its rounding step is
    /// coarse), two items of equal exact score but for a hair (the winner first), whose values
    /// follow the signs of the state's rounding errors in opposite directions, so that the first
    /// stage ranks the winner lower by about twice (errors' sum × largest value), far beyond
    /// the table's own rounding. The answer must still be the exact path's (the oracle). Where
    /// the kernel keeps the state in f32, the items are plain ties and the same holds.
    #[test]
    fn the_states_rounding_cannot_hide_the_exact_winner() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(41);
        let mut cases = 0;
        while cases < 24 {
            let dim = [8usize, 16, 33, 64, 128][rng.gen_range(0..5)];
            let mut state: Vec<f32> = (0..dim).map(|_| rng.gen_range(-1.0f32..1.0)).collect();
            state[0] = 30f32.copysign(state[0]);
            let (codes, scale) = exact::int8_state(&state);
            let error: Vec<f64> = state
                .iter()
                .zip(&codes)
                .map(|(&v, &code)| f64::from(v) - f64::from(scale) * f64::from(code))
                .collect();
            let sign = |k: usize| if error[k] < 0.0 { -1.0 } else { 1.0 };
            // Dimensions where the items differ by ±2 along the errors' signs, chosen so that
            // the exact scores stay nearly equal; the largest other value makes them equal.
            let mut others: Vec<usize> = (1..dim).collect();
            let balance = *others
                .iter()
                .max_by(|&&a, &&b| state[a].abs().total_cmp(&state[b].abs()))
                .expect("dim > 1");
            others.retain(|&k| k != balance);
            let (mut apart, mut drift) = (Vec::new(), 0f64);
            for k in others {
                let step = f64::from(state[k]) * sign(k);
                if (drift + step).abs() <= drift.abs() + 0.5 * f64::from(state[balance].abs()) {
                    apart.push(k);
                    drift += step;
                }
            }
            let balance_gap = -2.0 * drift / f64::from(state[balance]);
            if balance_gap.abs() > 2.0 {
                continue;
            }
            let (mut winner, mut runner_up) = (vec![0f32; dim], vec![0f32; dim]);
            for &k in &apart {
                winner[k] = sign(k) as f32;
                runner_up[k] = -sign(k) as f32;
            }
            winner[balance] = (balance_gap / 2.0) as f32;
            runner_up[balance] = -(balance_gap / 2.0) as f32;
            // Both lead through the large value; the runner-up by a hair less.
            winner[0] = state[0].signum();
            runner_up[0] = state[0].signum() * (1.0 - 1e-5);
            let exact_score = |item: &[f32]| {
                state
                    .iter()
                    .zip(item)
                    .map(|(&s, &x)| f64::from(s) * f64::from(x))
                    .sum::<f64>()
            };
            if exact_score(&winner) <= exact_score(&runner_up) {
                continue;
            }
            cases += 1;
            int8_finds_the_winner(&state, &winner, &runner_up, rng.gen());
        }
    }

    /// The same for the table's rounding: per random state (integers up to 127, which int8
    /// keeps exactly), a runner-up whose values int8 keeps exactly, and a winner a hair above it
    /// whose values int8 rounds down along the state's signs by almost half a step each, so
    /// that its first-stage score is below the runner-up's by about the bound itself.
    #[test]
    fn the_tables_rounding_cannot_hide_the_exact_winner() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(43);
        for _ in 0..24 {
            let dim = [8usize, 16, 33, 64, 128][rng.gen_range(0..5)];
            let mut state: Vec<f32> = (0..dim).map(|_| rng.gen_range(-127i32..=127) as f32).collect();
            state[0] = 127.0;
            // Both rows' largest value is 1, at dimension 0: their int8 step is 1/127.
            let step = 1.0 / 127.0;
            let sign = |k: usize| if state[k] < 0.0 { -1.0 } else { 1.0 };
            let mut order: Vec<usize> = (1..dim).collect();
            order.sort_by(|&a, &b| state[b].abs().total_cmp(&state[a].abs()));
            let total: f32 = order.iter().map(|&k| state[k].abs()).sum();
            // One step down along the state's signs on dimensions holding just under 0.49 of the
            // state's weight; the winner's values lie that far less a hair above those steps.
            let (mut down, mut taken) = (vec![0f32; dim], 0f32);
            for &k in &order {
                if taken + state[k].abs() <= 0.49 * total {
                    down[k] = sign(k);
                    taken += state[k].abs();
                }
            }
            let lift = taken / total + 1e-4;
            let (mut winner, mut runner_up) = (vec![1f32; dim], vec![1f32; dim]);
            for k in 1..dim {
                // Along the state, so that both lead the Gaussian items.
                let code = rng.gen_range(30i32..=100) as f32 * sign(k);
                runner_up[k] = code * step;
                winner[k] = (code - down[k]) * step + lift * step * sign(k);
            }
            int8_finds_the_winner(&state, &winner, &runner_up, rng.gen());
        }
    }

    /// Ranks `winner` (item 3) and `runner_up` (item 7) among small Gaussian items for `state`:
    /// the exact path must put the winner first, and the int8 first stage with shortlists of 1
    /// and 2 must give the exact answer.
    fn int8_finds_the_winner(state: &[f32], winner: &[f32], runner_up: &[f32], seed: i64) {
        let (items, dim) = (40i64, state.len());
        tch::manual_seed(seed);
        let mut rows =
            Vec::<f32>::try_from(Tensor::randn([items * dim as i64], (Kind::Float, Device::Cpu)) * 0.01).unwrap();
        rows[3 * dim..4 * dim].copy_from_slice(winner);
        rows[7 * dim..8 * dim].copy_from_slice(runner_up);
        let table = Tensor::from_slice(&rows).view([items, dim as i64]);
        let hidden = Tensor::from_slice(state).view([1, dim as i64]);
        let exact = Catalogue::new(&table, Retrieval::Exact).rank(&hidden, &[Vec::<i64>::new()], &[1]);
        assert_eq!(exact[0][0].0, 3, "the winner leads exactly: {exact:?}");
        for shortlist in [1, 2] {
            let retrieval = Retrieval::Shortlist {
                scan: Scan::Int8,
                shortlist,
            };
            let got = Catalogue::new(&table, retrieval).rank(&hidden, &[Vec::<i64>::new()], &[1]);
            assert_eq!(got, exact, "{dim} dimensions, shortlist {shortlist}");
        }
    }
}
