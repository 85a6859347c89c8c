//! The exact scoring kernels: the item table packed for the widest vector unit the CPU has, in
//! fp32, or in bf16 or int8 for a first stage that halves or quarters the copy.
use tch::Tensor;

use super::{host_table, search_tiles, BestK, TILE_ITEMS};

/// How far ahead of the block being scored its lines are fetched, in items.
const PREFETCH_ITEMS: usize = 96;

/// How the packed copy stores each value. The kernels widen bf16 and int8 to f32 as they load
/// them, so the arithmetic is the same; only the bytes read (and the answer's rounding) change.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Storage {
    Fp32,
    /// The upper half of each f32, rounded to nearest even: 8 bits of mantissa.
    Bf16,
    /// Per item, the values divided by `max |value| / 127` and rounded; the kernel multiplies
    /// each score by the item's scale.
    Int8,
}

impl Storage {
    fn value_bytes(self) -> usize {
        match self {
            Self::Fp32 => 4,
            Self::Bf16 => 2,
            Self::Int8 => 1,
        }
    }
}

/// `out[r·stride + j]` = `scale[j]` · Σ_k `states[r·dim + k]` · `panel[k·block_items + j]`, the
/// panel's values widened from the storage's type (`scales` is read for int8 only).
type BlockScores =
    unsafe fn(panel: *const u8, scales: *const f32, states: &[f32], dim: usize, stride: usize, out: &mut [f32]);

/// The scoring kernel this CPU runs: its block width and how many states it scores at once.
#[derive(Clone, Copy)]
struct Kernel {
    name: &'static str,
    /// Items per block of the packed table.
    block_items: usize,
    /// Hidden states scored together against a block.
    rows: usize,
    scores: BlockScores,
}

impl Kernel {
    /// The widest kernel the CPU runs for that storage; `None` off x86 or without AVX2 and FMA,
    /// where libtorch's GEMM does the scoring.
    fn detect(storage: Storage) -> Option<Self> {
        #[cfg(target_arch = "x86_64")]
        {
            use simd::*;
            // 8 states × 3 vectors of 16 items: 24 accumulators, 3 item vectors and a broadcast
            // fit AVX-512's 32 registers, and a step is 11 loads for 24 multiply-adds, bound by
            // the two FMA ports, not by the loads (one item vector × 16 states was 17 loads for
            // 16 multiply-adds and ran at half the FMA rate).
            if std::arch::is_x86_feature_detected!("avx512f") {
                let scores: BlockScores = match storage {
                    Storage::Fp32 => avx512_scores::<f32>,
                    Storage::Bf16 => avx512_scores::<u16>,
                    Storage::Int8 => avx512_scores::<i8>,
                };
                return Some(Self {
                    name: "AVX-512",
                    block_items: 3 * 16,
                    rows: 8,
                    scores,
                });
            }
            // 6 states × 2 vectors of 8 items: 12 accumulators, 2 item vectors and a broadcast
            // in AVX2's 16 registers, 8 loads for 12 multiply-adds.
            if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
                let scores: BlockScores = match storage {
                    Storage::Fp32 => avx2_scores::<f32>,
                    Storage::Bf16 => avx2_scores::<u16>,
                    Storage::Int8 => avx2_scores::<i8>,
                };
                return Some(Self {
                    name: "AVX2",
                    block_items: 2 * 8,
                    rows: 6,
                    scores,
                });
            }
        }
        let _ = storage;
        None
    }
}

/// The item table in blocks of `kernel.block_items` items, each block dimension-major (block
/// `b`, dimension `k`, lane `j` holds item `block_items·b + j`'s `k`-th value; items past the
/// end are zero), so that the kernel reads a block's vectors per dimension and multiplies each
/// by one broadcast hidden value.
/// MKL's GEMM on the plain table packs a copy of it on every call: for `[64, 128] × [128, 1M]`
/// that copy (512 MB read and written) and the `[64, 1M]` output were half the time.
pub(super) struct PackedItems {
    kernel: Kernel,
    storage: Storage,
    dim: usize,
    items: usize,
    /// The values in the storage's type, native byte order. u64 words so that the f32 and bf16
    /// values inside are aligned for their type.
    values: Vec<u64>,
    /// Per item (blocks padded), the int8 scale; empty for the other storages.
    scales: Vec<f32>,
    /// The largest |value| in the table, which bounds every stored value's rounding.
    max_abs: f32,
}

impl PackedItems {
    /// `None` where no kernel runs.
    pub(super) fn new(table: &Tensor, storage: Storage) -> Option<Self> {
        let kernel = Kernel::detect(storage)?;
        let block_items = kernel.block_items;
        let (items, dim) = (table.size()[0] as usize, table.size()[1] as usize);
        // The model's table is read in place; a copy only where it is not contiguous.
        let plain = host_table(table);
        let blocks = items.div_ceil(block_items);
        let value_bytes = storage.value_bytes();
        let length = blocks * dim * block_items * value_bytes;
        let mut values = vec![0u64; length.div_ceil(8)];
        // SAFETY: the u64 words are initialised and any byte pattern is a u64; bytes have no
        // alignment; the view ends before `values` is used again. Written in place: a separate
        // byte buffer would double the copy's memory while the model loads.
        let bytes = unsafe { std::slice::from_raw_parts_mut(values.as_mut_ptr().cast::<u8>(), length) };
        let mut scales = match storage {
            Storage::Int8 => vec![0f32; blocks * block_items],
            Storage::Fp32 | Storage::Bf16 => Vec::new(),
        };
        for (item, row) in plain.chunks(dim.max(1)).enumerate() {
            let block = (item / block_items) * dim * block_items;
            let scale = match storage {
                Storage::Int8 => {
                    let scale = row.iter().fold(0f32, |m, v| m.max(v.abs())) / 127.0;
                    scales[item] = scale;
                    scale
                }
                Storage::Fp32 | Storage::Bf16 => 1.0,
            };
            for (k, &value) in row.iter().enumerate() {
                let at = (block + k * block_items + item % block_items) * value_bytes;
                let to = &mut bytes[at..at + value_bytes];
                match storage {
                    Storage::Fp32 => to.copy_from_slice(&value.to_ne_bytes()),
                    Storage::Bf16 => to.copy_from_slice(&bf16_bits(value).to_ne_bytes()),
                    Storage::Int8 => to[0] = int8_code(value, scale) as u8,
                }
            }
        }
        Some(Self {
            kernel,
            storage,
            dim,
            items,
            values,
            scales,
            max_abs: plain.iter().fold(0f32, |m, v| m.max(v.abs())),
        })
    }

    /// How far a score from this copy can be from the exact path's score of the same item (both
    /// in f32), for a state whose absolute values sum to `state_l1`: each stored value's rounding
    /// (bf16: half a unit in the 8th significant bit; int8: half a step of `max / 127`), then
    /// both dot products' own f32 rounding (Higham's γ for `dim + 1` operations) and the int8
    /// scale's product. Infinite where a score could overflow f32 (or the state is NaN).
    pub(super) fn error_bound(&self, state_l1: f64) -> f64 {
        let rounding = match self.storage {
            Storage::Fp32 => 0.0,
            Storage::Bf16 => 2f64.powi(-8),
            // The code's division adds 127 units of f32 rounding to the half step.
            Storage::Int8 => (0.5 + 127.0 * 2f64.powi(-24)) / 127.0,
        };
        let largest = state_l1 * f64::from(self.max_abs);
        // int8 sums the state against the codes (up to 127) before scaling.
        let largest_sum = if self.storage == Storage::Int8 {
            state_l1 * 127.0
        } else {
            largest
        };
        let limit = f64::from(f32::MAX) / 2.0;
        if largest.is_nan() || largest_sum.is_nan() || largest.max(largest_sum) >= limit {
            return f64::INFINITY; // a score could overflow, and an infinite one is dropped
        }
        let unit = 2f64.powi(-24);
        let operations = (self.dim + 1) as f64;
        let gamma = operations * unit / (1.0 - operations * unit);
        largest * (rounding + (2.0 * gamma + unit) * (1.0 + rounding))
    }

    /// Offers every item's score for each hidden state (`states`: rows × dim) to that row's
    /// `best`, skipping the `excluded` items (sorted) of each row.
    pub(super) fn search(&self, states: &[f32], excluded: &[Vec<i64>], best: &mut [BestK]) {
        let Kernel {
            block_items,
            rows: group_rows,
            scores: block_scores,
            ..
        } = self.kernel;
        let dim = self.dim;
        // Rows padded to whole groups with zero states, whose scores nobody reads.
        let mut states = states.to_vec();
        states.resize(best.len().div_ceil(group_rows) * group_rows * dim, 0.0);
        let panel_bytes = dim * block_items * self.storage.value_bytes();
        let values: *const u8 = self.values.as_ptr().cast();
        search_tiles(self.items, group_rows, excluded, best, |tile, group, out| {
            let group_states = &states[group * group_rows * dim..][..group_rows * dim];
            let first_block = tile * TILE_ITEMS / block_items;
            let blocks = (TILE_ITEMS / block_items).min(self.items.div_ceil(block_items) - first_block);
            for block in 0..blocks {
                let at = first_block + block;
                // SAFETY: `new` packs a table only for a kernel this CPU runs, in the storage
                // that kernel reads; block `at` exists (`blocks` stops at the last one), its
                // panel is `panel_bytes` long and its scales (int8) `block_items`; the states
                // hold rows × dim, and `out` reaches the last row's items at
                // (rows − 1)·TILE_ITEMS + block_items ≤ its length.
                unsafe {
                    block_scores(
                        values.add(at * panel_bytes),
                        self.scales.as_ptr().wrapping_add(at * block_items),
                        group_states,
                        dim,
                        TILE_ITEMS,
                        &mut out[block * block_items..],
                    )
                };
            }
        });
    }

    /// Bytes of the packed copy.
    pub(super) fn bytes(&self) -> usize {
        self.values.len() * std::mem::size_of::<u64>() + self.scales.len() * std::mem::size_of::<f32>()
    }

    pub(super) fn kernel_name(&self) -> &'static str {
        self.kernel.name
    }

    pub(super) fn storage_name(&self) -> &'static str {
        match self.storage {
            Storage::Fp32 => "fp32",
            Storage::Bf16 => "bf16",
            Storage::Int8 => "int8",
        }
    }
}

/// `value` rounded to bf16 (nearest, ties to even), as its 16 bits. The table is finite.
fn bf16_bits(value: f32) -> u16 {
    let bits = value.to_bits();
    ((bits + 0x7fff + ((bits >> 16) & 1)) >> 16) as u16
}

/// `value / scale` rounded to the nearest int8 (a zero row keeps zeros).
fn int8_code(value: f32, scale: f32) -> i8 {
    if scale == 0.0 {
        0
    } else {
        (value / scale).round().clamp(-127.0, 127.0) as i8
    }
}

/// One kernel body for every vector width and storage: [`simd::Lanes`] names the few
/// instructions it needs, [`simd::Stored`] how a storage's values are widened to f32.
#[cfg(target_arch = "x86_64")]
mod simd {
    use std::arch::x86_64::*;

    use super::PREFETCH_ITEMS;

    pub(super) trait Lanes: Copy {
        const WIDTH: usize;
        unsafe fn zero() -> Self;
        unsafe fn load(from: *const f32) -> Self;
        /// `WIDTH` bf16 values widened to f32 (exactly: a bf16 is an f32's upper half).
        unsafe fn load_bf16(from: *const u16) -> Self;
        /// `WIDTH` int8 values converted to f32 (exactly).
        unsafe fn load_i8(from: *const i8) -> Self;
        unsafe fn splat(value: f32) -> Self;
        /// `self · b + c`.
        unsafe fn mul_add(self, b: Self, c: Self) -> Self;
        unsafe fn mul(self, b: Self) -> Self;
        unsafe fn store(self, to: *mut f32);
    }

    /// A storage's value type, as the kernel reads it.
    pub(super) trait Stored {
        /// Whether scores are multiplied by a per-item scale.
        const SCALED: bool;
        unsafe fn widen<L: Lanes>(from: *const Self) -> L;
    }

    impl Stored for f32 {
        const SCALED: bool = false;
        #[inline(always)]
        unsafe fn widen<L: Lanes>(from: *const Self) -> L {
            L::load(from)
        }
    }

    /// The bits of bf16 values.
    impl Stored for u16 {
        const SCALED: bool = false;
        #[inline(always)]
        unsafe fn widen<L: Lanes>(from: *const Self) -> L {
            L::load_bf16(from)
        }
    }

    impl Stored for i8 {
        const SCALED: bool = true;
        #[inline(always)]
        unsafe fn widen<L: Lanes>(from: *const Self) -> L {
            L::load_i8(from)
        }
    }

    impl Lanes for __m512 {
        const WIDTH: usize = 16;
        #[inline(always)]
        unsafe fn zero() -> Self {
            _mm512_setzero_ps()
        }
        #[inline(always)]
        unsafe fn load(from: *const f32) -> Self {
            _mm512_loadu_ps(from)
        }
        #[inline(always)]
        unsafe fn load_bf16(from: *const u16) -> Self {
            let wide = _mm512_cvtepu16_epi32(_mm256_loadu_si256(from.cast()));
            _mm512_castsi512_ps(_mm512_slli_epi32::<16>(wide))
        }
        #[inline(always)]
        unsafe fn load_i8(from: *const i8) -> Self {
            _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(from.cast())))
        }
        #[inline(always)]
        unsafe fn splat(value: f32) -> Self {
            _mm512_set1_ps(value)
        }
        #[inline(always)]
        unsafe fn mul_add(self, b: Self, c: Self) -> Self {
            _mm512_fmadd_ps(self, b, c)
        }
        #[inline(always)]
        unsafe fn mul(self, b: Self) -> Self {
            _mm512_mul_ps(self, b)
        }
        #[inline(always)]
        unsafe fn store(self, to: *mut f32) {
            _mm512_storeu_ps(to, self)
        }
    }

    impl Lanes for __m256 {
        const WIDTH: usize = 8;
        #[inline(always)]
        unsafe fn zero() -> Self {
            _mm256_setzero_ps()
        }
        #[inline(always)]
        unsafe fn load(from: *const f32) -> Self {
            _mm256_loadu_ps(from)
        }
        #[inline(always)]
        unsafe fn load_bf16(from: *const u16) -> Self {
            let wide = _mm256_cvtepu16_epi32(_mm_loadu_si128(from.cast()));
            _mm256_castsi256_ps(_mm256_slli_epi32::<16>(wide))
        }
        #[inline(always)]
        unsafe fn load_i8(from: *const i8) -> Self {
            _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(from.cast())))
        }
        #[inline(always)]
        unsafe fn splat(value: f32) -> Self {
            _mm256_set1_ps(value)
        }
        #[inline(always)]
        unsafe fn mul_add(self, b: Self, c: Self) -> Self {
            _mm256_fmadd_ps(self, b, c)
        }
        #[inline(always)]
        unsafe fn mul(self, b: Self) -> Self {
            _mm256_mul_ps(self, b)
        }
        #[inline(always)]
        unsafe fn store(self, to: *mut f32) {
            _mm256_storeu_ps(to, self)
        }
    }

    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn avx512_scores<E: Stored>(
        panel: *const u8,
        scales: *const f32,
        states: &[f32],
        dim: usize,
        stride: usize,
        out: &mut [f32],
    ) {
        block_scores::<__m512, E, 3, 8>(panel.cast(), scales, states, dim, stride, out)
    }

    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn avx2_scores<E: Stored>(
        panel: *const u8,
        scales: *const f32,
        states: &[f32],
        dim: usize,
        stride: usize,
        out: &mut [f32],
    ) {
        block_scores::<__m256, E, 2, 6>(panel.cast(), scales, states, dim, stride, out)
    }

    /// One block of `VECTORS · L::WIDTH` items against `ROWS` hidden states, accumulators in
    /// registers. Each dimension's step also asks for the same lines of the block
    /// [`PREFETCH_ITEMS`] ahead: every step reads new cache lines of the block, and with the
    /// hardware prefetchers alone a quarter of the AVX-512 kernel's samples waited on them;
    /// asking for a whole block at once instead stalled on the line fill buffers.
    #[inline(always)]
    unsafe fn block_scores<L: Lanes, E: Stored, const VECTORS: usize, const ROWS: usize>(
        panel: *const E,
        scales: *const f32,
        states: &[f32],
        dim: usize,
        stride: usize,
        out: &mut [f32],
    ) {
        let block_items = VECTORS * L::WIDTH;
        debug_assert!(states.len() >= ROWS * dim && out.len() >= (ROWS - 1) * stride + block_items);
        let (states, out) = (states.as_ptr(), out.as_mut_ptr());
        let ahead = panel.wrapping_add(PREFETCH_ITEMS * dim);
        let mut acc = [[L::zero(); VECTORS]; ROWS];
        for k in 0..dim {
            let step = k * block_items;
            let mut items = [L::zero(); VECTORS];
            for (v, items) in items.iter_mut().enumerate() {
                // A hint: it never faults, past the table's end too.
                _mm_prefetch::<_MM_HINT_T0>(ahead.wrapping_add(step + v * L::WIDTH).cast());
                *items = E::widen(panel.add(step + v * L::WIDTH));
            }
            for (r, acc) in acc.iter_mut().enumerate() {
                let state = L::splat(*states.add(r * dim + k));
                for (acc, &items) in acc.iter_mut().zip(&items) {
                    *acc = state.mul_add(items, *acc);
                }
            }
        }
        let mut scale = [L::zero(); VECTORS];
        if E::SCALED {
            for (v, scale) in scale.iter_mut().enumerate() {
                *scale = L::load(scales.add(v * L::WIDTH));
            }
        }
        for (r, acc) in acc.iter().enumerate() {
            for (v, &acc) in acc.iter().enumerate() {
                let acc = if E::SCALED { acc.mul(scale[v]) } else { acc };
                acc.store(out.add(r * stride + v * L::WIDTH));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;
    use tch::{Device, Kind};

    use super::*;

    /// The value a storage keeps of `value` in a row whose largest magnitude is `row_max`.
    fn stored(storage: Storage, value: f32, row_max: f32) -> f64 {
        match storage {
            Storage::Fp32 => f64::from(value),
            Storage::Bf16 => f64::from(f32::from_bits(u32::from(bf16_bits(value)) << 16)),
            Storage::Int8 => f64::from(int8_code(value, row_max / 127.0)) * f64::from(row_max / 127.0),
        }
    }

    proptest! {
        /// What the reduced storages keep is within their rounding of the value: bf16 half a
        /// unit of its 8-bit mantissa, int8 half a step of the row's scale.
        #[test]
        fn a_stored_value_is_within_half_a_step_of_the_value(value in -1e6f32..1e6, spread in 1f32..100.0) {
            let row_max = value.abs() * spread;
            let bf16 = stored(Storage::Bf16, value, row_max);
            prop_assert!((bf16 - f64::from(value)).abs() <= f64::from(value.abs()) / 256.0);
            let int8 = stored(Storage::Int8, value, row_max);
            prop_assert!((int8 - f64::from(value)).abs() <= f64::from(row_max) / 127.0 / 2.0 * 1.0001);
        }

        /// The kernel's score of every item, in every storage, against the dot product of the
        /// state with what the storage keeps of the item, summed in f64 (the oracle): any width,
        /// partial blocks and tiles, partial groups of states.
        #[test]
        fn every_storage_scores_each_item_as_its_stored_values_dotted_with_the_state(
            items in 1i64..2_000,
            dim in 1i64..150,
            rows in 1usize..14,
            seed in any::<i64>(),
            storage in prop::sample::select(vec![Storage::Fp32, Storage::Bf16, Storage::Int8]),
        ) {
            tch::manual_seed(seed);
            let table = Tensor::randn([items, dim], (Kind::Float, Device::Cpu));
            let states = Vec::<f32>::try_from(Tensor::randn([rows as i64 * dim], (Kind::Float, Device::Cpu))).unwrap();
            let Some(packed) = PackedItems::new(&table, storage) else {
                return Ok(());
            };
            let mut best: Vec<BestK> = (0..rows).map(|_| BestK::new(items as usize)).collect();
            packed.search(&states, &vec![Vec::new(); rows], &mut best);
            let plain = Vec::<f32>::try_from(table.reshape([-1])).unwrap();
            let dim = dim as usize;
            for (state, best) in states.chunks(dim).zip(best) {
                let scores = best.ranked(|item| item as u32);
                prop_assert_eq!(scores.len(), items as usize);
                for (item, score) in scores {
                    let row = &plain[item as usize * dim..][..dim];
                    let row_max = row.iter().fold(0f32, |m, v| m.max(v.abs()));
                    let terms = state.iter().zip(row).map(|(&s, &x)| f64::from(s) * stored(storage, x, row_max));
                    let (oracle, size) = terms.fold((0.0, 0.0), |(sum, size), t| (sum + t, size + t.abs()));
                    prop_assert!(
                        (f64::from(score) - oracle).abs() <= 1e-5 * size + 1e-6,
                        "item {}: {} vs {}", item, score, oracle
                    );
                }
            }
        }
    }
}
