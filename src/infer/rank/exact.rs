//! The exact scoring kernels: the item table packed for the widest vector unit the CPU has.
use tch::Tensor;

use super::{host_table, search_tiles, BestK, TILE_ITEMS};

/// How far ahead of the block being scored its lines are fetched, in items.
const PREFETCH_ITEMS: usize = 96;

/// The scoring kernel this CPU runs: its block width and how many states it scores at once.
#[derive(Clone, Copy)]
struct Kernel {
    name: &'static str,
    /// Items per block of the packed table.
    block_items: usize,
    /// Hidden states scored together against a block.
    rows: usize,
    /// `out[r·stride + j]` = Σ_k `states[r·dim + k]` · `panel[k·block_items + j]`.
    scores: unsafe fn(panel: &[f32], states: &[f32], dim: usize, stride: usize, out: &mut [f32]),
}

impl Kernel {
    /// The widest kernel the CPU runs; `None` off x86 or without AVX2 and FMA, where libtorch's
    /// GEMM does the scoring.
    fn detect() -> Option<Self> {
        #[cfg(target_arch = "x86_64")]
        {
            // 8 states × 3 vectors of 16 items: 24 accumulators, 3 item vectors and a broadcast
            // fit AVX-512's 32 registers, and a step is 11 loads for 24 multiply-adds, bound by
            // the two FMA ports, not by the loads (one item vector × 16 states was 17 loads for
            // 16 multiply-adds and ran at half the FMA rate).
            if std::arch::is_x86_feature_detected!("avx512f") {
                return Some(Self {
                    name: "AVX-512",
                    block_items: 3 * 16,
                    rows: 8,
                    scores: simd::avx512_scores,
                });
            }
            // 6 states × 2 vectors of 8 items: 12 accumulators, 2 item vectors and a broadcast
            // in AVX2's 16 registers, 8 loads for 12 multiply-adds.
            if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
                return Some(Self {
                    name: "AVX2",
                    block_items: 2 * 8,
                    rows: 6,
                    scores: simd::avx2_scores,
                });
            }
        }
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
    dim: usize,
    items: usize,
    values: Vec<f32>,
}

impl PackedItems {
    /// `None` where no kernel runs.
    pub(super) fn new(table: &Tensor) -> Option<Self> {
        let kernel = Kernel::detect()?;
        let block_items = kernel.block_items;
        let (items, dim) = (table.size()[0] as usize, table.size()[1] as usize);
        // The model's table is read in place; a copy only where it is not contiguous.
        let plain = host_table(table);
        let blocks = items.div_ceil(block_items);
        let mut values = vec![0f32; blocks * dim * block_items];
        for (item, row) in plain.chunks(dim.max(1)).enumerate() {
            let block = &mut values[(item / block_items) * dim * block_items..][..dim * block_items];
            for (k, &value) in row.iter().enumerate() {
                block[k * block_items + item % block_items] = value;
            }
        }
        Some(Self {
            kernel,
            dim,
            items,
            values,
        })
    }

    /// Offers every item's score for each hidden state (`states`: rows × dim) to that row's
    /// `best`, skipping the `excluded` items (sorted) of each row.
    pub(super) fn search(&self, mut states: Vec<f32>, excluded: &[Vec<i64>], best: &mut [BestK]) {
        let Kernel {
            block_items,
            rows: group_rows,
            scores: block_scores,
            ..
        } = self.kernel;
        let dim = self.dim;
        // Rows padded to whole groups with zero states, whose scores nobody reads.
        states.resize(best.len().div_ceil(group_rows) * group_rows * dim, 0.0);
        search_tiles(self.items, group_rows, excluded, best, |tile, group, out| {
            let group_states = &states[group * group_rows * dim..][..group_rows * dim];
            let panels = self.values[tile * TILE_ITEMS * dim..].chunks_exact(dim * block_items);
            for (block, panel) in panels.take(TILE_ITEMS / block_items).enumerate() {
                // SAFETY: `new` packs a table only for a kernel this CPU runs; the panel holds
                // dim × block_items values, the states rows × dim, and `out` reaches the last
                // row's items at (rows − 1)·TILE_ITEMS + block_items ≤ its length.
                unsafe { block_scores(panel, group_states, dim, TILE_ITEMS, &mut out[block * block_items..]) };
            }
        });
    }

    /// Bytes of the packed copy.
    pub(super) fn bytes(&self) -> usize {
        self.values.len() * std::mem::size_of::<f32>()
    }

    pub(super) fn kernel_name(&self) -> &'static str {
        self.kernel.name
    }
}

/// One kernel body for every vector width: [`simd::Lanes`] names the few instructions it needs.
#[cfg(target_arch = "x86_64")]
mod simd {
    use std::arch::x86_64::*;

    use super::PREFETCH_ITEMS;

    pub(super) trait Lanes: Copy {
        const WIDTH: usize;
        unsafe fn zero() -> Self;
        unsafe fn load(from: *const f32) -> Self;
        unsafe fn splat(value: f32) -> Self;
        /// `self · b + c`.
        unsafe fn mul_add(self, b: Self, c: Self) -> Self;
        unsafe fn store(self, to: *mut f32);
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
        unsafe fn splat(value: f32) -> Self {
            _mm512_set1_ps(value)
        }
        #[inline(always)]
        unsafe fn mul_add(self, b: Self, c: Self) -> Self {
            _mm512_fmadd_ps(self, b, c)
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
        unsafe fn splat(value: f32) -> Self {
            _mm256_set1_ps(value)
        }
        #[inline(always)]
        unsafe fn mul_add(self, b: Self, c: Self) -> Self {
            _mm256_fmadd_ps(self, b, c)
        }
        #[inline(always)]
        unsafe fn store(self, to: *mut f32) {
            _mm256_storeu_ps(to, self)
        }
    }

    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn avx512_scores(panel: &[f32], states: &[f32], dim: usize, stride: usize, out: &mut [f32]) {
        block_scores::<__m512, 3, 8>(panel, states, dim, stride, out)
    }

    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn avx2_scores(panel: &[f32], states: &[f32], dim: usize, stride: usize, out: &mut [f32]) {
        block_scores::<__m256, 2, 6>(panel, states, dim, stride, out)
    }

    /// One block of `VECTORS · L::WIDTH` items against `ROWS` hidden states, accumulators in
    /// registers. Each dimension's step also asks for the same lines of the block
    /// [`PREFETCH_ITEMS`] ahead: every step reads new cache lines of the block, and with the
    /// hardware prefetchers alone a quarter of the AVX-512 kernel's samples waited on them;
    /// asking for a whole block at once instead stalled on the line fill buffers.
    #[inline(always)]
    unsafe fn block_scores<L: Lanes, const VECTORS: usize, const ROWS: usize>(
        panel: &[f32],
        states: &[f32],
        dim: usize,
        stride: usize,
        out: &mut [f32],
    ) {
        let block_items = VECTORS * L::WIDTH;
        debug_assert!(
            panel.len() >= dim * block_items
                && states.len() >= ROWS * dim
                && out.len() >= (ROWS - 1) * stride + block_items
        );
        let (panel, states, out) = (panel.as_ptr(), states.as_ptr(), out.as_mut_ptr());
        let ahead = panel.wrapping_add(PREFETCH_ITEMS * dim);
        let mut acc = [[L::zero(); VECTORS]; ROWS];
        for k in 0..dim {
            let step = k * block_items;
            let mut items = [L::zero(); VECTORS];
            for (v, items) in items.iter_mut().enumerate() {
                // A hint: it never faults, past the table's end too.
                _mm_prefetch::<_MM_HINT_T0>(ahead.wrapping_add(step + v * L::WIDTH).cast());
                *items = L::load(panel.add(step + v * L::WIDTH));
            }
            for (r, acc) in acc.iter_mut().enumerate() {
                let state = L::splat(*states.add(r * dim + k));
                for (acc, &items) in acc.iter_mut().zip(&items) {
                    *acc = state.mul_add(items, *acc);
                }
            }
        }
        for (r, acc) in acc.iter().enumerate() {
            for (v, acc) in acc.iter().enumerate() {
                acc.store(out.add(r * stride + v * L::WIDTH));
            }
        }
    }
}
