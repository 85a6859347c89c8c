//! The Transformer's incremental pass on the host, for CPU serving in fp32.
//!
//! An append computes a couple of positions per user: a few million multiply-adds per batch,
//! spread over ~100 libtorch operations of ~3–7 µs dispatch each, so on CPU the operations'
//! overhead, not their arithmetic, was most of the pass (docs/BENCHMARKS.md, issue 12). Here
//! the same computation is a handful of GEMMs (`matrixmultiply`) over every row's new positions
//! packed together, and attention reads and writes the keys and values in the prefix pool's
//! memory directly: no gather of the prefixes, no padding of rows to the longest append. The
//! libtorch path (`Network::extend`) stays the reference and the path for CUDA and bf16;
//! `tests/incremental.rs` holds both to a full forward pass.

use tch::{nn, Tensor};

use super::input::{host_f32_view, to_host_f32};

/// libtorch's default, with which every layer norm of the model is built.
const LAYER_NORM_EPS: f32 = 1e-5;

#[derive(Debug)]
struct Linear {
    /// `[outputs, inputs]`, as libtorch keeps it.
    weight: Vec<f32>,
    bias: Vec<f32>,
    inputs: usize,
    outputs: usize,
}

impl Linear {
    fn new(linear: &nn::Linear) -> Self {
        let [outputs, inputs] = linear.ws.size()[..] else {
            panic!("a linear layer's weight is a matrix");
        };
        Self {
            weight: to_host_f32(&linear.ws),
            bias: linear
                .bs
                .as_ref()
                .map_or_else(|| vec![0.0; outputs as usize], to_host_f32),
            inputs: inputs as usize,
            outputs: outputs as usize,
        }
    }

    /// `x · weightᵀ + bias` for the `n` rows of `x` (`[n, inputs]`), into `out` (`[n, outputs]`).
    fn apply(&self, x: &[f32], n: usize, out: &mut Vec<f32>) {
        debug_assert_eq!(x.len(), n * self.inputs);
        out.clear();
        for _ in 0..n {
            out.extend_from_slice(&self.bias);
        }
        if n == 0 {
            return;
        }
        // SAFETY: `x` holds n × inputs values, `weight` outputs × inputs (read transposed
        // through its strides), `out` n × outputs; the strides stay inside those lengths.
        unsafe {
            matrixmultiply::sgemm(
                n,
                self.inputs,
                self.outputs,
                1.0,
                x.as_ptr(),
                self.inputs as isize,
                1,
                self.weight.as_ptr(),
                1,
                self.inputs as isize,
                1.0,
                out.as_mut_ptr(),
                self.outputs as isize,
                1,
            );
        }
    }
}

/// An fp32 table in host memory (an embedding's weight), read in place: the item table may
/// be hundreds of megabytes, which a copy would double.
pub(super) struct HostTable<'a> {
    values: &'a [f32],
    width: usize,
}

impl<'a> HostTable<'a> {
    /// `None` unless `table` is a contiguous fp32 matrix in host memory.
    pub(super) fn of(table: &'a Tensor) -> Option<Self> {
        let &[_, width] = &table.size()[..] else { return None };
        Some(Self {
            values: host_f32_view(table)?,
            width: width as usize,
        })
    }

    pub(super) fn row(&self, index: i64) -> &'a [f32] {
        let at = index as usize * self.width;
        &self.values[at..at + self.width]
    }

    pub(super) fn width(&self) -> usize {
        self.width
    }
}

#[derive(Debug)]
struct LayerNorm {
    weight: Vec<f32>,
    bias: Vec<f32>,
}

impl LayerNorm {
    fn new(norm: &nn::LayerNorm) -> Self {
        let width = norm.normalized_shape.iter().product::<i64>() as usize;
        Self {
            weight: norm.ws.as_ref().map_or_else(|| vec![1.0; width], to_host_f32),
            bias: norm.bs.as_ref().map_or_else(|| vec![0.0; width], to_host_f32),
        }
    }

    /// Normalises one row of `x` into `out`.
    fn row(&self, x: &[f32], out: &mut [f32]) {
        let width = x.len() as f32;
        let mean = x.iter().sum::<f32>() / width;
        let variance = x.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / width;
        let scale = 1.0 / (variance + LAYER_NORM_EPS).sqrt();
        for (((o, &v), &w), &b) in out.iter_mut().zip(x).zip(&self.weight).zip(&self.bias) {
            *o = (v - mean) * scale * w + b;
        }
    }

    fn apply(&self, x: &[f32], out: &mut Vec<f32>) {
        let width = self.weight.len();
        out.resize(x.len(), 0.0);
        for (row, out) in x.chunks(width).zip(out.chunks_mut(width)) {
            self.row(row, out);
        }
    }
}

#[derive(Debug)]
struct Block {
    attn_norm: LayerNorm,
    qkv: Linear,
    attn_out: Linear,
    ffn_norm: LayerNorm,
    ffn_in: Linear,
    ffn_out: Linear,
}

/// Host copies of a Transformer's weights (read once, when a prefix pool is made for it).
#[derive(Debug)]
pub struct HostTransformer {
    blocks: Vec<Block>,
    final_norm: LayerNorm,
    /// `[cap + 1, heads]` bias by sessions between key and query; `None`: no bias.
    session_bias: Option<Vec<f32>>,
    session_cap: i64,
    heads: usize,
    head_dim: usize,
}

/// The weights of one block, in libtorch's modules.
pub(super) struct BlockWeights<'a> {
    pub attn_norm: &'a nn::LayerNorm,
    pub qkv: &'a nn::Linear,
    pub attn_out: &'a nn::Linear,
    pub ffn_norm: &'a nn::LayerNorm,
    pub ffn_in: &'a nn::Linear,
    pub ffn_out: &'a nn::Linear,
}

/// One row's attention inputs within a pass.
struct Attention<'a> {
    row: &'a HostRow<'a>,
    /// `[new, 3 × d]` queries, keys and values of the row's new positions.
    qkv: &'a [f32],
    key_at: usize,
    value_at: usize,
    per_position: usize,
    scale: f32,
}

/// One row of an incremental pass: where its slot's positions are in the pool's memory, the
/// sessions of the positions it holds and of the new ones, and the new positions' inputs.
pub(super) struct HostRow<'a> {
    /// Offset of the slot's first position in the pool's values.
    pub slot_offset: usize,
    pub held_sessions: &'a [i64],
    pub new_sessions: &'a [i64],
    /// `[new, d]` input embeddings of the new positions.
    pub inputs: &'a [f32],
}

impl HostTransformer {
    pub(super) fn new(
        blocks: Vec<BlockWeights>,
        final_norm: &nn::LayerNorm,
        session_bias: Option<&Tensor>,
        session_cap: i64,
        heads: usize,
    ) -> Self {
        let d = blocks[0].qkv.ws.size()[1] as usize;
        Self {
            blocks: blocks
                .into_iter()
                .map(|b| Block {
                    attn_norm: LayerNorm::new(b.attn_norm),
                    qkv: Linear::new(b.qkv),
                    attn_out: Linear::new(b.attn_out),
                    ffn_norm: LayerNorm::new(b.ffn_norm),
                    ffn_in: Linear::new(b.ffn_in),
                    ffn_out: Linear::new(b.ffn_out),
                })
                .collect(),
            final_norm: LayerNorm::new(final_norm),
            session_bias: session_bias.map(to_host_f32),
            session_cap,
            heads,
            head_dim: d / heads,
        }
    }

    fn width(&self) -> usize {
        self.heads * self.head_dim
    }

    /// Values one position takes in the pool: keys and values of every layer.
    pub(super) fn per_position(&self) -> usize {
        2 * self.blocks.len() * self.width()
    }

    /// Runs every row's new positions after the positions its slot holds, writing their keys
    /// and values into `states` (the pool's values, `[slots, max_len, 2 × layers, H, head_dim]`)
    /// right after the held ones, and returns each row's newest final hidden state (`[B, d]`).
    /// The caller decides which of the written positions the slot keeps.
    pub(super) fn extend(&self, rows: &[HostRow], states: &mut [f32]) -> Vec<f32> {
        let d = self.width();
        let per_position = self.per_position();
        let offsets: Vec<usize> = rows
            .iter()
            .scan(0, |next, row| {
                let at = *next;
                *next += row.new_sessions.len();
                Some(at)
            })
            .collect();
        let n = rows.iter().map(|row| row.new_sessions.len()).sum::<usize>();
        let mut x: Vec<f32> = rows.iter().flat_map(|row| row.inputs.iter().copied()).collect();
        assert_eq!(x.len(), n * d, "inputs of every new position");
        let (mut normed, mut qkv, mut attended, mut projected, mut hidden) =
            (Vec::new(), Vec::new(), vec![0.0; n * d], Vec::new(), Vec::new());
        let mut weights = Vec::new();
        let scale = 1.0 / (self.head_dim as f32).sqrt();
        for (layer, block) in self.blocks.iter().enumerate() {
            let (key_at, value_at) = (2 * layer * d, (2 * layer + 1) * d);
            let parts = || [key_at..key_at + d, value_at..value_at + d];
            if let Some(row) = rows.first() {
                prefetch_held(states, row, per_position, parts());
            }
            block.attn_norm.apply(&x, &mut normed);
            block.qkv.apply(&normed, n, &mut qkv);
            for (i, (row, &first)) in rows.iter().zip(&offsets).enumerate() {
                if let Some(next) = rows.get(i + 1) {
                    prefetch_held(states, next, per_position, parts());
                }
                let held = row.held_sessions.len();
                for j in 0..row.new_sessions.len() {
                    let position = row.slot_offset + (held + j) * per_position;
                    let new = &qkv[(first + j) * 3 * d..(first + j + 1) * 3 * d];
                    states[position + key_at..position + key_at + d].copy_from_slice(&new[d..2 * d]);
                    states[position + value_at..position + value_at + d].copy_from_slice(&new[2 * d..]);
                }
                let attention = Attention {
                    row,
                    qkv: &qkv[first * 3 * d..],
                    key_at,
                    value_at,
                    per_position,
                    scale,
                };
                self.attend(&attention, states, &mut attended[first * d..], &mut weights);
            }
            block.attn_out.apply(&attended, n, &mut projected);
            add_into(&mut x, &projected);
            block.ffn_norm.apply(&x, &mut normed);
            block.ffn_in.apply(&normed, n, &mut hidden);
            gelu_in_place(&mut hidden);
            block.ffn_out.apply(&hidden, n, &mut projected);
            add_into(&mut x, &projected);
        }
        let mut newest = vec![0.0; rows.len() * d];
        for ((row, &first), out) in rows.iter().zip(&offsets).zip(newest.chunks_mut(d)) {
            let last = first + row.new_sessions.len() - 1;
            self.final_norm.row(&x[last * d..(last + 1) * d], out);
        }
        newest
    }

    /// Attention of one row's new positions, for every head: their queries against the keys
    /// the slot holds and their own (causal), into `out` (`[new, d]`). Compiled twice: with
    /// AVX2 and FMA where the CPU has them (the dot products and weighted sums are most of an
    /// append's host time), else for the baseline the binary targets.
    fn attend(&self, a: &Attention, states: &[f32], out: &mut [f32], weights: &mut Vec<f32>) {
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
            // SAFETY: the CPU has the features the function is compiled for.
            return unsafe { self.attend_avx2(a, states, out, weights) };
        }
        self.attend_portable(a, states, out, weights)
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn attend_avx2(&self, a: &Attention, states: &[f32], out: &mut [f32], weights: &mut Vec<f32>) {
        self.attend_portable(a, states, out, weights)
    }

    #[inline(always)]
    fn attend_portable(&self, a: &Attention, states: &[f32], attended: &mut [f32], weights: &mut Vec<f32>) {
        let d = self.width();
        let held = a.row.held_sessions.len();
        for j in 0..a.row.new_sessions.len() {
            let query_session = a.row.new_sessions[j];
            let keys = held + j + 1; // causal: the prefix, the earlier new ones, itself
            let query = &a.qkv[j * 3 * d..j * 3 * d + d];
            for head in 0..self.heads {
                let part = head * self.head_dim..(head + 1) * self.head_dim;
                let q = &query[part.clone()];
                weights.clear();
                let mut largest = f32::NEG_INFINITY;
                for t in 0..keys {
                    let at = a.row.slot_offset + t * a.per_position + a.key_at + part.start;
                    let k = &states[at..at + self.head_dim];
                    let key_session = match t < held {
                        true => a.row.held_sessions[t],
                        false => a.row.new_sessions[t - held],
                    };
                    let logit = dot(q, k) * a.scale + self.bias(query_session - key_session, head);
                    largest = largest.max(logit);
                    weights.push(logit);
                }
                let mut total = 0.0;
                for w in weights.iter_mut() {
                    *w = (*w - largest).exp();
                    total += *w;
                }
                let out = &mut attended[j * d + part.start..j * d + part.end];
                out.fill(0.0);
                for (t, &w) in weights.iter().enumerate() {
                    let at = a.row.slot_offset + t * a.per_position + a.value_at + part.start;
                    let v = &states[at..at + self.head_dim];
                    let w = w / total;
                    for (o, &v) in out.iter_mut().zip(v) {
                        *o += w * v;
                    }
                }
            }
        }
    }

    /// Session-recency bias of a key `distance` sessions before the query, for `head`.
    #[inline(always)]
    fn bias(&self, distance: i64, head: usize) -> f32 {
        match &self.session_bias {
            Some(table) => table[distance.clamp(0, self.session_cap) as usize * self.heads + head],
            None => 0.0,
        }
    }
}

/// Eight running sums, so that the compiler may keep them in vector registers (one running
/// sum is a chain of dependent additions it must not reorder).
#[inline(always)]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut sums = [0.0f32; 8];
    let (a_chunks, b_chunks) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = a_chunks
        .remainder()
        .iter()
        .zip(b_chunks.remainder())
        .map(|(a, b)| a * b)
        .sum();
    for (a, b) in a_chunks.zip(b_chunks) {
        for i in 0..8 {
            sums[i] += a[i] * b[i];
        }
    }
    sums.iter().sum::<f32>() + tail
}

/// Asks the CPU to bring `row`'s held keys and values of one layer (`parts` of each position)
/// towards its caches. Served users' prefixes are cold (one user's requests are far apart
/// among thousands of others) and a position's layer is a pool stride (1 KiB at d = 64) from
/// the next one's: under load most of attention's samples sat on its first load of each key
/// and value. Issued one row ahead, the loads overlap the previous row's arithmetic
/// (`append_cold_pool` in benches/inference.rs: about 9 % off an append pass).
fn prefetch_held(states: &[f32], row: &HostRow, per_position: usize, parts: [std::ops::Range<usize>; 2]) {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
        const FLOATS_PER_LINE: usize = 16;
        for t in 0..row.held_sessions.len() {
            let position = row.slot_offset + t * per_position;
            for part in &parts {
                for at in part.clone().step_by(FLOATS_PER_LINE) {
                    let line = states[position + at..].as_ptr();
                    // SAFETY: a prefetch is only a hint; `line` points inside `states`.
                    unsafe { _mm_prefetch::<_MM_HINT_T0>(line.cast()) };
                }
            }
        }
    }
}

pub(super) fn add_into(x: &mut [f32], y: &[f32]) {
    x.iter_mut().zip(y).for_each(|(x, y)| *x += y);
}

/// GELU in its exact form (`x · Φ(x)`, as the model was trained) over `values`, in place.
/// The error function is a rational approximation, clamped where it reaches ±1, a
/// loop the compiler vectorises; within 2e-6 of libtorch's GELU (absolute, relative beyond
/// 1; test below), the float error function's own error where 1 + erf cancels. libtorch's own
/// call, through oneDNN's primitive cache, was 5 % of the inference worker's time under load
/// for a few thousand values per pass, and a scalar `erff` per value cost more than that.
fn gelu_in_place(values: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
        // SAFETY: the CPU has the features the function is compiled for.
        return unsafe { gelu_avx2(values) };
    }
    gelu_portable(values)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn gelu_avx2(values: &mut [f32]) {
    gelu_portable(values)
}

#[inline(always)]
fn gelu_portable(values: &mut [f32]) {
    // erf(x) ≈ x · P(x²) / Q(x²) (the approximation Eigen and XLA use for f32), and ±1 from
    // where erf is 1 in f32: there the approximation is a few ulps short of it, and GELU of a
    // large negative value must be 0, not a few ulps of its size.
    const ERF_IS_ONE: f32 = 3.9;
    const P: [f32; 7] = [
        -2.726_142_3e-10,
        2.770_681_4e-8,
        -2.101_024e-6,
        -5.692_506_4e-5,
        -7.349_906_3e-4,
        -2.954_6e-3,
        -1.609_603_3e-2,
    ];
    const Q: [f32; 5] = [
        -1.456_607_2e-5,
        -2.133_740_6e-4,
        -1.682_827e-3,
        -7.373_329_2e-3,
        -1.426_474e-2,
    ];
    for v in values.iter_mut() {
        let x = (*v * std::f32::consts::FRAC_1_SQRT_2).clamp(-ERF_IS_ONE, ERF_IS_ONE);
        let x2 = x * x;
        let p = P.iter().fold(0.0, |acc, &c| acc * x2 + c);
        let q = Q.iter().fold(0.0, |acc, &c| acc * x2 + c);
        let erf = if x2 >= ERF_IS_ONE * ERF_IS_ONE {
            1f32.copysign(x)
        } else {
            x * p / q
        };
        *v *= 0.5 * (1.0 + erf);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gelu_is_libtorchs_within_2e_6() {
        let values: Vec<f32> = (-20_000..=20_000)
            .map(|i| i as f32 * 6e-4)
            .chain([-50.0, 50.0, 0.0])
            .collect();
        let expected = to_host_f32(&Tensor::from_slice(&values).gelu("none"));
        let mut got = values.clone();
        gelu_in_place(&mut got);
        let error = |(g, e): (&f32, &f32)| (g - e).abs() / e.abs().max(1.0);
        let (at, worst) = got
            .iter()
            .zip(&expected)
            .map(error)
            .enumerate()
            .fold((0, 0.0f32), |a, b| if b.1 > a.1 { b } else { a });
        assert!(worst < 2e-6, "largest error {worst} at {}", values[at]);
    }
}
