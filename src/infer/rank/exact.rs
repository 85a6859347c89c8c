//! The exact scoring kernels: the item table packed for the widest vector unit the CPU has, in
//! fp32, or in bf16 or int8 for a first stage that halves or quarters the copy.
use tch::Tensor;

use super::{host_table, search_tiles, BestK, TILE_ITEMS};

/// The widest state the byte-quad kernel takes: its i32 sums reach 255 · 127 per dimension.
const MAX_BYTE_QUAD_DIM: usize = 65_536;

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

/// `out[r·stride + j]` = `scale[j]` · Σ_k state `r`'s value `k` · the panel's value `k` of item `j`
/// (`scales` is read for int8 only), in the kernel's [`Layout`].
type BlockScores =
    unsafe fn(panel: *const u8, scales: *const f32, states: &GroupStates, stride: usize, out: &mut [f32]);

/// [`BlockScores`] for `blocks` consecutive blocks (each `panel_bytes` long, with
/// `block_items` scales), `out`'s items in the same order.
type RunScores = unsafe fn(
    panel: *const u8,
    panel_bytes: usize,
    blocks: usize,
    scales: *const f32,
    states: &GroupStates,
    stride: usize,
    out: &mut [f32],
);

/// How a kernel is called: per block, or per run of blocks (AMX: the states stay in tiles for
/// the run, and one block's scaling overlaps the next block's products).
#[derive(Clone, Copy)]
enum Scoring {
    Block(BlockScores),
    Run(RunScores),
}

/// How a kernel reads the table's values and the hidden states.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Layout {
    /// Each dimension's values of a block's items together, widened to f32 as they load; the
    /// states in f32.
    Floats,
    /// int8 codes plus 128 (as u8), each item's four consecutive dimensions together, which
    /// VNNI's byte dot product (and AMX's tile product) multiplies by four int8 codes of the
    /// state at once (the states are rounded to int8 too, see [`int8_state`]); dimensions padded
    /// to a multiple of four.
    ByteQuads,
}

/// The hidden states of one group of a kernel's rows, as its [`Layout`] reads them.
pub(super) struct GroupStates<'a> {
    /// Per row `row_words` words: f32 bits (floats) or four int8 codes (byte quads).
    words: &'a [u32],
    row_words: usize,
    /// Byte quads only, per row: the state's scale, and 128 × the sum of its codes (what the
    /// table's offset adds to each score).
    scales: &'a [f32],
    offsets: &'a [i32],
}

/// Every row's hidden state as the kernel reads it, rows padded to whole groups with zeros
/// (whose scores nobody reads).
struct PreparedStates {
    words: Vec<u32>,
    row_words: usize,
    scales: Vec<f32>,
    offsets: Vec<i32>,
}

impl PreparedStates {
    fn new(layout: Layout, states: &[f32], dim: usize, rows: usize) -> Self {
        match layout {
            Layout::Floats => {
                let mut words: Vec<u32> = states.iter().map(|v| v.to_bits()).collect();
                words.resize(rows * dim, 0);
                Self {
                    words,
                    row_words: dim,
                    scales: Vec::new(),
                    offsets: Vec::new(),
                }
            }
            Layout::ByteQuads => {
                let row_words = dim.div_ceil(4);
                let mut prepared = Self {
                    words: vec![0; rows * row_words],
                    row_words,
                    scales: vec![0.0; rows],
                    offsets: vec![0; rows],
                };
                for (row, state) in states.chunks_exact(dim.max(1)).enumerate() {
                    let (mut codes, scale) = int8_state(state);
                    codes.resize(row_words * 4, 0);
                    for (word, quad) in prepared.words[row * row_words..][..row_words]
                        .iter_mut()
                        .zip(codes.chunks_exact(4))
                    {
                        *word = u32::from_le_bytes([quad[0] as u8, quad[1] as u8, quad[2] as u8, quad[3] as u8]);
                    }
                    prepared.scales[row] = scale;
                    prepared.offsets[row] = 128 * codes.iter().map(|&c| i32::from(c)).sum::<i32>();
                }
                prepared
            }
        }
    }

    fn group(&self, group: usize, rows: usize) -> GroupStates<'_> {
        let per_row = group * rows..(group + 1) * rows;
        GroupStates {
            words: &self.words[per_row.start * self.row_words..per_row.end * self.row_words],
            row_words: self.row_words,
            scales: self.scales.get(per_row.clone()).unwrap_or_default(),
            offsets: self.offsets.get(per_row).unwrap_or_default(),
        }
    }
}

/// A scoring kernel: its block width and how many states it scores at once.
#[derive(Clone, Copy)]
struct Kernel {
    name: &'static str,
    /// Items per block of the packed table.
    block_items: usize,
    /// Hidden states scored together against a block.
    rows: usize,
    layout: Layout,
    /// Whether the kernel computes in AMX tiles, which a search configures before its first block
    /// (the thread's tile configuration is whatever libtorch last left there).
    tiles: bool,
    scores: Scoring,
}

impl Kernel {
    /// The widest kernel the CPU runs for that storage and `dim` values per item; `None` off x86
    /// or without AVX2 and FMA, where libtorch's GEMM does the scoring.
    fn detect(storage: Storage, dim: usize) -> Option<Self> {
        Self::runnable(storage, dim).into_iter().next()
    }

    /// Every kernel this CPU runs for that storage and `dim`, widest first.
    fn runnable(storage: Storage, dim: usize) -> Vec<Self> {
        let mut kernels = Vec::new();
        #[cfg(target_arch = "x86_64")]
        {
            use simd::*;
            let byte_quads = storage == Storage::Int8 && dim <= MAX_BYTE_QUAD_DIM;
            // int8 by AMX's tile products: one instruction multiplies 16 states by 16 items over
            // 64 dimensions (16,384 byte multiply-adds, 16 cycles' worth of VNNI's). 32 states ×
            // 16 items × 128 dimensions, the byte quads' own width there: narrower tables would
            // be padded with zeros to 128, so they keep VNNI and its smaller copy.
            #[cfg(target_os = "linux")]
            if byte_quads
                && dim.next_multiple_of(4) == amx::DIMS
                && amx::available()
                && std::arch::is_x86_feature_detected!("avx512f")
            {
                kernels.push(Self {
                    name: "AMX",
                    block_items: amx::BLOCK_ITEMS,
                    rows: amx::ROWS,
                    layout: Layout::ByteQuads,
                    tiles: true,
                    scores: Scoring::Run(amx::amx_scores),
                });
            }
            // int8 by VNNI's byte dot products: four multiply-adds of bytes per 32-bit lane, so
            // an instruction does 64 where an f32 one does 16, and the codes need no widening.
            // The same 8 states × 3 vectors of 16 items.
            if byte_quads
                && std::arch::is_x86_feature_detected!("avx512f")
                && std::arch::is_x86_feature_detected!("avx512vnni")
            {
                kernels.push(Self {
                    name: "AVX-512 VNNI",
                    block_items: 3 * 16,
                    rows: 8,
                    layout: Layout::ByteQuads,
                    tiles: false,
                    scores: Scoring::Block(vnni_scores),
                });
            }
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
                kernels.push(Self {
                    name: "AVX-512",
                    block_items: 3 * 16,
                    rows: 8,
                    layout: Layout::Floats,
                    tiles: false,
                    scores: Scoring::Block(scores),
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
                kernels.push(Self {
                    name: "AVX2",
                    block_items: 2 * 8,
                    rows: 6,
                    layout: Layout::Floats,
                    tiles: false,
                    scores: Scoring::Block(scores),
                });
            }
        }
        let _ = (storage, dim);
        kernels
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
    /// The largest Euclidean norm of an item as stored, and of an item's rounding (stored −
    /// value), for the error bound's Cauchy–Schwarz terms.
    max_norm: f64,
    max_rounding_norm: f64,
}

impl PackedItems {
    /// `None` where no kernel runs.
    pub(super) fn new(table: &Tensor, storage: Storage) -> Option<Self> {
        let kernel = Kernel::detect(storage, table.size()[1] as usize)?;
        Some(Self::for_kernel(table, storage, kernel))
    }

    /// The table packed for `kernel`, which must run on this CPU.
    fn for_kernel(table: &Tensor, storage: Storage, kernel: Kernel) -> Self {
        let (items, dim) = (table.size()[0] as usize, table.size()[1] as usize);
        let block_items = kernel.block_items;
        // The model's table is read in place; a copy only where it is not contiguous.
        let plain = host_table(table);
        let blocks = items.div_ceil(block_items);
        let value_bytes = storage.value_bytes();
        let padded_dim = padded_dim(kernel.layout, dim);
        let length = blocks * padded_dim * block_items * value_bytes;
        let mut values = vec![0u64; length.div_ceil(8)];
        // SAFETY: the u64 words are initialised and any byte pattern is a u64; bytes have no
        // alignment; the view ends before `values` is used again. Written in place: a separate
        // byte buffer would double the copy's memory while the model loads.
        let bytes = unsafe { std::slice::from_raw_parts_mut(values.as_mut_ptr().cast::<u8>(), length) };
        let mut scales = match storage {
            Storage::Int8 => vec![0f32; blocks * block_items],
            Storage::Fp32 | Storage::Bf16 => Vec::new(),
        };
        let (mut max_norm, mut max_rounding_norm) = (0f64, 0f64);
        for (item, row) in plain.chunks(dim.max(1)).enumerate() {
            let block = (item / block_items) * padded_dim * block_items;
            let scale = match storage {
                Storage::Int8 => {
                    let scale = row.iter().fold(0f32, |m, v| m.max(v.abs())) / 127.0;
                    scales[item] = scale;
                    scale
                }
                Storage::Fp32 | Storage::Bf16 => 1.0,
            };
            let kept = row.iter().map(|&value| stored_value(storage, value, scale));
            max_norm = max_norm.max(norm(kept.clone()));
            max_rounding_norm =
                max_rounding_norm.max(norm(kept.zip(row).map(|(kept, &value)| kept - f64::from(value))));
            for (k, &value) in row.iter().enumerate() {
                let lane = item % block_items;
                let at = match kernel.layout {
                    Layout::Floats => (block + k * block_items + lane) * value_bytes,
                    Layout::ByteQuads => block + ((k / 4) * block_items + lane) * 4 + k % 4,
                };
                let to = &mut bytes[at..at + value_bytes];
                match (storage, kernel.layout) {
                    (Storage::Fp32, _) => to.copy_from_slice(&value.to_ne_bytes()),
                    (Storage::Bf16, _) => to.copy_from_slice(&bf16_bits(value).to_ne_bytes()),
                    (Storage::Int8, Layout::Floats) => to[0] = int8_code(value, scale) as u8,
                    (Storage::Int8, Layout::ByteQuads) => to[0] = (int8_code(value, scale) as u8) ^ 0x80,
                }
            }
        }
        Self {
            kernel,
            storage,
            dim,
            items,
            values,
            scales,
            max_abs: plain.iter().fold(0f32, |m, v| m.max(v.abs())),
            max_norm,
            max_rounding_norm,
        }
    }

    /// How far a score from this copy can be from the exact path's score of the same item (both
    /// in f32), for `state`. The true scores differ by state · (item − stored item), plus, where
    /// the kernel rounds the state to int8 too (byte quads), (state − rounded state) · stored
    /// item; each is bounded by the smaller of Hölder's (the state's L1 norm times the largest
    /// value's rounding, bf16 half a unit in the 8th significant bit, int8 half a step of
    /// `max / 127`) and Cauchy–Schwarz's (Euclidean norms, the items' largest). Then both dot
    /// products' own f32 rounding (Higham's γ for `dim + 1` operations) and the scales'
    /// products (the byte sums are exact). Infinite where a score could overflow f32 (or the
    /// state is NaN).
    pub(super) fn error_bound(&self, state: &[f32]) -> f64 {
        let rounding = match self.storage {
            Storage::Fp32 => 0.0,
            Storage::Bf16 => 2f64.powi(-8),
            // The code's division adds 127 units of f32 rounding to the half step.
            Storage::Int8 => (0.5 + 127.0 * 2f64.powi(-24)) / 127.0,
        };
        let state_l1: f64 = state.iter().map(|&v| f64::from(v.abs())).sum();
        let state_rounding: Vec<f64> = match self.kernel.layout {
            Layout::Floats => Vec::new(),
            Layout::ByteQuads => {
                let (codes, scale) = int8_state(state);
                let rounded = codes.iter().map(|&code| f64::from(scale) * f64::from(code));
                state.iter().zip(rounded).map(|(&v, r)| f64::from(v) - r).collect()
            }
        };
        let state_rounding_l1: f64 = state_rounding.iter().map(|e| e.abs()).sum();
        let max_abs = f64::from(self.max_abs);
        let largest = (state_l1 + state_rounding_l1) * max_abs;
        // The float kernels sum the state against the int8 codes (up to 127) before scaling.
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
        // The norms are sums in f64, whose rounding the slack covers many times over.
        let slack = 1.0 + 1e-9;
        let table_term = (state_l1 * max_abs * rounding)
            .min(norm(state.iter().map(|&v| f64::from(v))) * self.max_rounding_norm * slack);
        // A stored value is at most the row's largest (an int8 one by its scale's rounding).
        let state_term = (state_rounding_l1 * max_abs * (1.0 + 4.0 * unit))
            .min(norm(state_rounding.iter().copied()) * self.max_norm * slack);
        table_term + state_term + largest * (2.0 * gamma + 3.0 * unit) * (1.0 + rounding)
    }

    /// Offers every item's score for each hidden state (`states`: rows × dim) to that row's
    /// `best`, skipping the `excluded` items (sorted) of each row.
    pub(super) fn search(&self, states: &[f32], excluded: &[Vec<i64>], best: &mut [BestK]) {
        let Kernel {
            block_items,
            rows: group_rows,
            scores: scoring,
            ..
        } = self.kernel;
        let layout = self.kernel.layout;
        let states = PreparedStates::new(layout, states, self.dim, best.len().div_ceil(group_rows) * group_rows);
        let panel_bytes = padded_dim(layout, self.dim) * block_items * self.storage.value_bytes();
        #[cfg(all(target_arch = "x86_64", target_os = "linux"))]
        let _tiles = self.kernel.tiles.then(|| {
            // SAFETY: `tiles` is set only where `amx::available()` said the CPU and the kernel
            // allow them; released when the search ends, on this thread.
            unsafe { amx::Tiles::configure() }
        });
        let values: *const u8 = self.values.as_ptr().cast();
        search_tiles(self.items, group_rows, excluded, best, |tile, group, out| {
            let group_states = states.group(group, group_rows);
            let first_block = tile * TILE_ITEMS / block_items;
            let blocks = (TILE_ITEMS / block_items).min(self.items.div_ceil(block_items) - first_block);
            let (panel, scales) = (
                values.wrapping_add(first_block * panel_bytes),
                self.scales.as_ptr().wrapping_add(first_block * block_items),
            );
            // SAFETY: `new` packs a table only for a kernel this CPU runs, in the storage that
            // kernel reads; blocks `first_block ..` exist (`blocks` stops at the last one), each
            // panel is `panel_bytes` long with (int8) `block_items` scales; the states hold the
            // group's rows in the kernel's layout, and `out` reaches the last row's items at
            // (rows − 1)·TILE_ITEMS + blocks·block_items ≤ its length.
            unsafe {
                match scoring {
                    Scoring::Run(run) => run(panel, panel_bytes, blocks, scales, &group_states, TILE_ITEMS, out),
                    Scoring::Block(block_scores) => {
                        for block in 0..blocks {
                            block_scores(
                                panel.add(block * panel_bytes),
                                scales.wrapping_add(block * block_items),
                                &group_states,
                                TILE_ITEMS,
                                &mut out[block * block_items..],
                            )
                        }
                    }
                }
            };
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

/// The value a storage keeps of `value`, as the kernels read it (`scale`: the row's int8 scale).
fn stored_value(storage: Storage, value: f32, scale: f32) -> f64 {
    match storage {
        Storage::Fp32 => f64::from(value),
        Storage::Bf16 => f64::from(f32::from_bits(u32::from(bf16_bits(value)) << 16)),
        Storage::Int8 => f64::from(int8_code(value, scale)) * f64::from(scale),
    }
}

/// The Euclidean norm, in f64.
fn norm(values: impl Iterator<Item = f64>) -> f64 {
    values.map(|v| v * v).sum::<f64>().sqrt()
}

/// Dimensions as a layout stores them.
fn padded_dim(layout: Layout, dim: usize) -> usize {
    match layout {
        Layout::Floats => dim,
        Layout::ByteQuads => dim.next_multiple_of(4),
    }
}

/// A hidden state rounded to int8 codes as the table's rows are (its scale `max |value| / 127`).
pub(super) fn int8_state(state: &[f32]) -> (Vec<i8>, f32) {
    let scale = state.iter().fold(0f32, |m, v| m.max(v.abs())) / 127.0;
    (state.iter().map(|&v| int8_code(v, scale)).collect(), scale)
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

    use super::{GroupStates, PREFETCH_ITEMS};

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
        states: &GroupStates,
        stride: usize,
        out: &mut [f32],
    ) {
        block_scores::<__m512, E, 3, 8>(panel.cast(), scales, states, stride, out)
    }

    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn avx2_scores<E: Stored>(
        panel: *const u8,
        scales: *const f32,
        states: &GroupStates,
        stride: usize,
        out: &mut [f32],
    ) {
        block_scores::<__m256, E, 2, 6>(panel.cast(), scales, states, stride, out)
    }

    /// A block of 3 × 16 items against 8 states by byte dot products (layout
    /// [`ByteQuads`](super::Layout::ByteQuads)): per quad of dimensions, each state's four codes
    /// broadcast against each item vector's 64 bytes. The u8 codes carry +128, so the sums are
    /// the int8 products plus 128 × the state's code sum, taken off before the two scales
    /// (all sums exact in i32: 255 · 127 · dimensions).
    #[target_feature(enable = "avx512f,avx512vnni")]
    pub(super) unsafe fn vnni_scores(
        panel: *const u8,
        scales: *const f32,
        states: &GroupStates,
        stride: usize,
        out: &mut [f32],
    ) {
        const VECTORS: usize = 3;
        const ROWS: usize = 8;
        const BLOCK_BYTES: usize = VECTORS * 64;
        let quads = states.row_words;
        debug_assert!(states.words.len() >= ROWS * quads && states.scales.len() >= ROWS);
        debug_assert!(out.len() >= (ROWS - 1) * stride + VECTORS * 16);
        let (words, out) = (states.words.as_ptr(), out.as_mut_ptr());
        let ahead = panel.wrapping_add(PREFETCH_ITEMS * quads * 4);
        let mut acc = [[_mm512_setzero_si512(); VECTORS]; ROWS];
        for quad in 0..quads {
            let step = quad * BLOCK_BYTES;
            let mut items = [_mm512_setzero_si512(); VECTORS];
            for (v, items) in items.iter_mut().enumerate() {
                _mm_prefetch::<_MM_HINT_T0>(ahead.wrapping_add(step + v * 64).cast());
                *items = _mm512_loadu_si512(panel.add(step + v * 64).cast());
            }
            for (r, acc) in acc.iter_mut().enumerate() {
                let state = _mm512_set1_epi32(*words.add(r * quads + quad) as i32);
                for (acc, &items) in acc.iter_mut().zip(&items) {
                    *acc = _mm512_dpbusd_epi32(*acc, items, state);
                }
            }
        }
        for v in 0..VECTORS {
            let item_scale = _mm512_loadu_ps(scales.add(v * 16));
            for (r, acc) in acc.iter().enumerate() {
                let sum = _mm512_sub_epi32(acc[v], _mm512_set1_epi32(states.offsets[r]));
                let score = _mm512_mul_ps(_mm512_cvtepi32_ps(sum), item_scale);
                _mm512_storeu_ps(
                    out.add(r * stride + v * 16),
                    _mm512_mul_ps(score, _mm512_set1_ps(states.scales[r])),
                );
            }
        }
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
        states: &GroupStates,
        stride: usize,
        out: &mut [f32],
    ) {
        let block_items = VECTORS * L::WIDTH;
        let dim = states.row_words;
        debug_assert!(states.words.len() >= ROWS * dim && out.len() >= (ROWS - 1) * stride + block_items);
        // The float layout's words are f32 bits.
        let (states, out) = (states.words.as_ptr().cast::<f32>(), out.as_mut_ptr());
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

/// AMX's int8 tiles (Sapphire Rapids and later): detection, the per-thread tile configuration,
/// and the kernel. Stable Rust has no AMX intrinsics, so the few instructions are inline
/// assembly; the tile registers are not the compiler's, so they live across `asm!` blocks.
#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
mod amx {
    use std::arch::asm;
    use std::arch::x86_64::*;
    use std::marker::PhantomData;
    use std::sync::OnceLock;

    use super::GroupStates;

    /// Linux's `arch_prctl` request for permission to use an extended state component, and
    /// AMX's tile data component: without the grant the first tile instruction faults.
    const ARCH_REQ_XCOMP_PERM: libc::c_ulong = 0x1023;
    const XFEATURE_XTILEDATA: libc::c_ulong = 18;
    /// States per tile (its rows) and bytes of a tile row: 64 dimensions of int8, or 16 lanes of
    /// i32 sums.
    const TILE_ROWS: usize = 16;
    const ROW_BYTES: usize = 64;
    /// Tiles of 16 states scored together, and the dimensions the kernel takes (two tile rows):
    /// the states' 2 × 2 tiles stay loaded for a whole run of blocks.
    const STATE_TILES: usize = 2;
    pub(super) const DIMS: usize = 2 * ROW_BYTES;
    /// States scored together, items per block (one tile).
    pub(super) const ROWS: usize = STATE_TILES * TILE_ROWS;
    pub(super) const BLOCK_ITEMS: usize = 16;
    /// How many blocks ahead of the one being scored its lines are fetched (into L2): without
    /// it the scan of a 1M-item table for 32 states took 24 ms, with it 18.5 (2, 8 or 16
    /// blocks ahead, or into L1, 19.5–20.5).
    const AHEAD_BLOCKS: usize = 4;

    /// Whether the CPU has AMX's int8 products and Linux lets this process use the tiles (asked
    /// once; the grant is for the whole process).
    pub(super) fn available() -> bool {
        static GRANTED: OnceLock<bool> = OnceLock::new();
        *GRANTED.get_or_init(|| {
            let leaf = __cpuid_count(7, 0);
            let (tile, int8) = (leaf.edx >> 24 & 1 == 1, leaf.edx >> 25 & 1 == 1);
            // SAFETY: a request for a permission, which reads and writes no memory of ours.
            tile && int8 && unsafe { libc::syscall(libc::SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) } == 0
        })
    }

    /// `ldtilecfg`'s 64-byte operand (palette 1).
    #[repr(C, align(64))]
    struct Config {
        palette: u8,
        start_row: u8,
        reserved: [u8; 14],
        bytes_per_row: [u16; 16],
        rows: [u8; 16],
    }

    /// The kernel's tiles configured on this thread until dropped: 0 and 1 the sums of a block
    /// (a tile per 16 states), 2 to 5 the states (16 states × 64 dimensions each), 6 and 7 the
    /// block's items (a tile per 64 dimensions); every one 16 rows of 64 bytes.
    pub(super) struct Tiles(PhantomData<*const ()>);

    impl Tiles {
        /// # Safety
        /// [`available`] must have returned true; the value must be dropped on this thread.
        pub(super) unsafe fn configure() -> Self {
            let mut config = Config {
                palette: 1,
                start_row: 0,
                reserved: [0; 14],
                bytes_per_row: [0; 16],
                rows: [0; 16],
            };
            for tile in 0..8 {
                config.bytes_per_row[tile] = ROW_BYTES as u16;
                config.rows[tile] = TILE_ROWS as u8;
            }
            // SAFETY: the operand is a valid palette-1 configuration; the caller vouches for AMX.
            unsafe { asm!("ldtilecfg [{}]", in(reg) &raw const config, options(nostack, readonly)) };
            // Not `Send` (the raw pointer): the release must run on the configuring thread.
            Self(PhantomData)
        }
    }

    impl Drop for Tiles {
        fn drop(&mut self) {
            // SAFETY: the tiles were configured on this thread (`configure`'s contract).
            unsafe { asm!("tilerelease", options(nostack, nomem)) };
        }
    }

    /// One block's sums, a row per state.
    #[repr(C, align(64))]
    struct Sums([[i32; BLOCK_ITEMS]; ROWS]);

    /// Blocks of 16 items against 32 states (layout [`ByteQuads`](super::Layout::ByteQuads),
    /// 128 dimensions): the states' int8 codes are loaded into four tiles once (a row per
    /// state, 64 dimensions a tile), then per block the items' two tiles (a row per quad of
    /// dimensions: 16 items × 4 bytes, as the packed block holds them), and `tdpbsud` multiplies
    /// the signed state codes by the items' unsigned ones. A tile load costs three products
    /// here (15 ns against 5 ns, measured), so the kernel loads each item once per 32 states,
    /// and the states once per run. The i32 sums are VNNI's exactly, and the scaling is its
    /// instructions in its order, so the scores are the VNNI kernel's to the bit.
    ///
    /// # Safety
    /// [`Tiles::configure`] on this thread, not yet dropped; AVX-512F; `states` holds [`ROWS`]
    /// rows of 32 words, each of the `blocks` panels 32 rows of 64 bytes, `out`
    /// ([`ROWS`] − 1) · `stride` + `blocks` · [`BLOCK_ITEMS`] values.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn amx_scores(
        panel: *const u8,
        panel_bytes: usize,
        blocks: usize,
        scales: *const f32,
        states: &GroupStates,
        stride: usize,
        out: &mut [f32],
    ) {
        debug_assert!(
            states.row_words * 4 == DIMS && states.words.len() >= ROWS * DIMS / 4 && states.scales.len() >= ROWS
        );
        debug_assert!(out.len() >= (ROWS - 1) * stride + blocks * BLOCK_ITEMS);
        debug_assert_eq!(panel_bytes, DIMS * BLOCK_ITEMS);
        let codes = states.words.as_ptr().cast::<u8>();
        // SAFETY: the caller configured tiles 0..=7 as 16 rows of 64 bytes; tiles 2..=5 read
        // 16 state rows of 64 bytes each inside `states`' 32 rows of 128 bytes.
        unsafe {
            asm!(
                "tileloadd tmm2, [{first} + {stride} * 1]",
                "tileloadd tmm3, [{first} + {stride} * 1 + 64]",
                "tileloadd tmm4, [{later} + {stride} * 1]",
                "tileloadd tmm5, [{later} + {stride} * 1 + 64]",
                first = in(reg) codes,
                later = in(reg) codes.add(TILE_ROWS * DIMS),
                stride = in(reg) DIMS,
                options(nostack, readonly),
            );
        }
        let mut sums = [Sums([[0; BLOCK_ITEMS]; ROWS]), Sums([[0; BLOCK_ITEMS]; ROWS])];
        for block in 0..blocks {
            let items = panel.add(block * panel_bytes);
            let ahead = items.wrapping_add(AHEAD_BLOCKS * panel_bytes);
            for line in (0..panel_bytes).step_by(64) {
                // A hint: it never faults, past the table's end too.
                _mm_prefetch::<_MM_HINT_T1>(ahead.wrapping_add(line).cast());
            }
            // SAFETY: the item tiles read the block's 32 quad rows of 64 bytes, in the panel the
            // caller vouches for; the products use the configured tiles only.
            unsafe {
                asm!(
                    "tileloadd tmm6, [{items} + {stride} * 1]",
                    "tileloadd tmm7, [{items} + {stride} * 1 + 1024]",
                    "tilezero tmm0",
                    "tilezero tmm1",
                    "tdpbsud tmm0, tmm2, tmm6",
                    "tdpbsud tmm1, tmm4, tmm6",
                    "tdpbsud tmm0, tmm3, tmm7",
                    "tdpbsud tmm1, tmm5, tmm7",
                    items = in(reg) items,
                    stride = in(reg) ROW_BYTES,
                    options(nostack, readonly),
                );
            }
            // The previous block's scaling runs while this block's products do.
            if block > 0 {
                scale_sums(&sums[(block - 1) % 2], block - 1, scales, states, stride, out);
            }
            let held = &mut sums[block % 2];
            // SAFETY: the stores write `held`'s 32 rows of 64 bytes.
            unsafe {
                asm!(
                    "tilestored [{first} + {stride} * 1], tmm0",
                    "tilestored [{later} + {stride} * 1], tmm1",
                    first = in(reg) held.0.as_mut_ptr(),
                    later = in(reg) held.0[TILE_ROWS..].as_mut_ptr(),
                    stride = in(reg) BLOCK_ITEMS * 4,
                    options(nostack),
                );
            }
        }
        if blocks > 0 {
            scale_sums(&sums[(blocks - 1) % 2], blocks - 1, scales, states, stride, out);
        }
    }

    /// Block `block`'s scores from its sums: VNNI's epilogue.
    #[inline(always)]
    unsafe fn scale_sums(
        sums: &Sums,
        block: usize,
        scales: *const f32,
        states: &GroupStates,
        stride: usize,
        out: &mut [f32],
    ) {
        let out = out.as_mut_ptr().add(block * BLOCK_ITEMS);
        let item_scale = _mm512_loadu_ps(scales.add(block * BLOCK_ITEMS));
        for (r, sums) in sums.0.iter().enumerate() {
            let sum = _mm512_sub_epi32(
                _mm512_loadu_si512(sums.as_ptr().cast()),
                _mm512_set1_epi32(states.offsets[r]),
            );
            let score = _mm512_mul_ps(_mm512_cvtepi32_ps(sum), item_scale);
            _mm512_storeu_ps(
                out.add(r * stride),
                _mm512_mul_ps(score, _mm512_set1_ps(states.scales[r])),
            );
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
        stored_value(storage, value, row_max / 127.0)
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

        /// The kernel's score of every item, in every storage, against the dot product of what
        /// the kernel keeps of the state (itself, or its int8 rounding for byte quads) with what
        /// the storage keeps of the item, summed in f64 (the oracle): any width, partial blocks
        /// and tiles, partial groups of states.
        #[test]
        fn every_storage_scores_each_item_as_its_stored_values_dotted_with_the_state(
            items in 1i64..2_000,
            // Every kernel's widths, and AMX's (125..=128) often.
            dim in prop_oneof![1i64..150, 125i64..=128],
            rows in 1usize..40,
            seed in any::<i64>(),
            storage in prop::sample::select(vec![Storage::Fp32, Storage::Bf16, Storage::Int8]),
        ) {
            tch::manual_seed(seed);
            let table = Tensor::randn([items, dim], (Kind::Float, Device::Cpu));
            let states = Vec::<f32>::try_from(Tensor::randn([rows as i64 * dim], (Kind::Float, Device::Cpu))).unwrap();
            let plain = Vec::<f32>::try_from(table.reshape([-1])).unwrap();
            for kernel in Kernel::runnable(storage, dim as usize) {
            let packed = PackedItems::for_kernel(&table, storage, kernel);
            let mut best: Vec<BestK> = (0..rows).map(|_| BestK::new(items as usize)).collect();
            packed.search(&states, &vec![Vec::new(); rows], &mut best);
            let dim = dim as usize;
            for (state, best) in states.chunks(dim).zip(best) {
                let state: Vec<f64> = match packed.kernel.layout {
                    Layout::Floats => state.iter().map(|&v| f64::from(v)).collect(),
                    Layout::ByteQuads => {
                        let (codes, scale) = int8_state(state);
                        codes.iter().map(|&code| f64::from(code) * f64::from(scale)).collect()
                    }
                };
                let scores = best.ranked(|item| item as u32);
                prop_assert_eq!(scores.len(), items as usize);
                for (item, score) in scores {
                    let row = &plain[item as usize * dim..][..dim];
                    let row_max = row.iter().fold(0f32, |m, v| m.max(v.abs()));
                    let terms = state.iter().zip(row).map(|(&s, &x)| s * stored(storage, x, row_max));
                    let (oracle, size) = terms.fold((0.0, 0.0), |(sum, size), t| (sum + t, size + t.abs()));
                    prop_assert!(
                        (f64::from(score) - oracle).abs() <= 1e-5 * size + 1e-6,
                        "{} kernel, item {}: {} vs {}", kernel.name, item, score, oracle
                    );
                }
            }
            }
        }

        /// Every byte-quad kernel this CPU runs (AMX, VNNI) gives the same int8 scores to the
        /// bit: the same integer sums, scaled by the same instructions in the same order.
        #[test]
        fn the_byte_quad_kernels_agree_to_the_bit(
            items in 1i64..2_000,
            // AMX's widths (125..=128) often.
            dim in prop_oneof![1i64..=128, 125i64..=128],
            rows in 1usize..40,
            seed in any::<i64>(),
        ) {
            tch::manual_seed(seed);
            let table = Tensor::randn([items, dim], (Kind::Float, Device::Cpu)) * 3.0;
            let states = Vec::<f32>::try_from(Tensor::randn([rows as i64 * dim], (Kind::Float, Device::Cpu))).unwrap();
            let scores = |kernel: Kernel| {
                let packed = PackedItems::for_kernel(&table, Storage::Int8, kernel);
                let mut best: Vec<BestK> = (0..rows).map(|_| BestK::new(items as usize)).collect();
                packed.search(&states, &vec![Vec::new(); rows], &mut best);
                best.into_iter().map(|best| best.ranked(|item| item as u32)).collect::<Vec<_>>()
            };
            let kernels: Vec<Kernel> = Kernel::runnable(Storage::Int8, dim as usize)
                .into_iter()
                .filter(|kernel| kernel.layout == Layout::ByteQuads)
                .collect();
            if let Some((first, others)) = kernels.split_first() {
                let expected = scores(*first);
                for kernel in others {
                    prop_assert!(scores(*kernel) == expected, "{} against {}", kernel.name, first.name);
                }
            }
        }
    }
}
