//! The networks: a shared input embedding, the causal Transformer and the LSTM baseline.
use std::sync::Arc;

use tch::nn;
use tch::{Device, Kind, Tensor};

use super::config::{Arch, Combine, ModelConfig, PositionOrigin};
use super::dropout::{Dropout, MaskSource};
use super::host::{add_into, BlockWeights, HostTable, HostTransformer};
use super::input::{to_device_pinned, to_host_f32, Batch, Field};
use super::prefix::{PrefixPool, Slot};
use crate::data::session::{DAYS_PER_WEEK, HOURS_PER_DAY, NUM_GAP_BUCKETS};

/// New positions per row up to which an extension is short: such passes run on the host
/// kernel where the pool has one (an append's few positions cost libtorch more in operation
/// dispatch than in arithmetic), longer ones (a window computed afresh) through libtorch,
/// whose GEMMs and fused attention win there (docs/BENCHMARKS.md). Servers extend short and
/// long rows in separate passes, so that one recompute does not pad every append to its width.
pub const SHORT_APPEND: usize = 4;

const EMBED_INIT: nn::Init = nn::Init::Randn { mean: 0.0, stdev: 0.02 };

fn embedding(p: nn::Path, rows: i64, dim: i64) -> nn::Embedding {
    nn::embedding(
        p,
        rows,
        dim,
        nn::EmbeddingConfig {
            ws_init: EMBED_INIT,
            ..Default::default()
        },
    )
}

/// `[.., in] → [.., out]` initialised as PyTorch's `nn.Linear` is (weights and bias uniform in
/// ±1/√in), as the PyTorch twin's model is. tch's default draws the weights √6 times wider
/// (Kaiming for ReLU), which on ML-1M trained a worse model than the twin on the same recipe.
fn linear(p: nn::Path, in_dim: i64, out_dim: i64) -> nn::Linear {
    let bound = 1.0 / (in_dim as f64).sqrt();
    let uniform = nn::Init::Uniform { lo: -bound, up: bound };
    let config = nn::LinearConfig {
        ws_init: uniform,
        bs_init: Some(uniform),
        bias: true,
    };
    nn::linear(p, in_dim, out_dim, config)
}

/// Item, position and the enabled per-event features, merged into `[B, L, d]`.
#[derive(Debug)]
struct InputEmbedding {
    items: nn::Embedding,
    positions: nn::Embedding,
    gaps: Option<nn::Embedding>,
    types: Option<nn::Embedding>,
    prediction_gaps: Option<nn::Embedding>,
    calendar: Option<Calendar>,
    session_summary: Option<nn::Linear>,
    concat_projection: Option<nn::Linear>,
    origin: PositionOrigin,
    dropout: Dropout,
}

impl InputEmbedding {
    fn new(p: &nn::Path, cfg: &ModelConfig, masks: &Arc<MaskSource>) -> Self {
        let d = cfg.d_model as i64;
        let f = &cfg.features;
        let optional = |on: bool, name: &str, rows: i64| on.then(|| embedding(p / name, rows, d));
        let gaps = optional(f.time_gap, "gap_embedding", NUM_GAP_BUCKETS);
        let types = optional(f.event_type, "type_embedding", cfg.num_event_types as i64);
        let prediction_gaps = optional(f.prediction_gap, "prediction_gap_embedding", NUM_GAP_BUCKETS);
        let calendar = f.calendar.then(|| Calendar::new(p, d));
        let session_summary = f
            .session_summary
            .then(|| linear(p / "session_summary_projection", d, d));
        let parts = 2 + [
            f.time_gap,
            f.event_type,
            f.prediction_gap,
            f.calendar,
            f.session_summary,
        ]
        .iter()
        .filter(|&&on| on)
        .count() as i64;
        let concat_projection = (f.combine == Combine::Concat).then(|| linear(p / "concat_projection", parts * d, d));
        Self {
            items: embedding(p / "item_embedding", cfg.num_items as i64, d),
            positions: embedding(p / "position_embedding", cfg.max_len as i64, d),
            gaps,
            types,
            prediction_gaps,
            calendar,
            session_summary,
            concat_projection,
            origin: f.positions,
            dropout: Dropout::new(cfg.dropout, masks),
        }
    }

    fn forward(&self, batch: &Batch, train: bool) -> Tensor {
        self.forward_last(batch, batch.seq_len(), train)
    }

    /// `[B, m, d]`: the inputs of the last `m` positions of `batch` only.
    fn forward_last(&self, batch: &Batch, m: i64, train: bool) -> Tensor {
        let last = |index: &Tensor| index.narrow(1, batch.seq_len() - m, m);
        let mut parts = vec![
            last(&batch.items).apply(&self.items),
            last(&self.positions(batch)).apply(&self.positions),
        ];
        let features = [
            (&self.gaps, &batch.gaps),
            (&self.types, &batch.types),
            (&self.prediction_gaps, &batch.prediction_gaps),
        ];
        for (table, index) in features {
            if let Some(table) = table {
                parts.push(last(index).apply(table));
            }
        }
        if let Some(calendar) = &self.calendar {
            parts.push(calendar.forward(&last(&batch.prediction_hours)));
        }
        if let Some(projection) = &self.session_summary {
            let items = batch.items.apply(&self.items);
            parts.push(last(&previous_session_mean(batch, &items)).apply(projection));
        }

        let merged = match &self.concat_projection {
            Some(projection) => Tensor::cat(&parts, -1).apply(projection),
            None => parts
                .into_iter()
                .reduce(|acc, part| acc + part)
                .expect("at least two parts"),
        };
        let real = last(&batch.real_mask()).unsqueeze(-1).to_kind(merged.kind());
        self.dropout.apply(&merged, train) * real
    }

    /// The inputs of each row's last `fresh[row]` positions, packed row after row
    /// (`[Σ fresh, d]`) and computed on the host: [`Self::forward_last`]'s values (the same
    /// table rows, added in the same order) without its ~20 libtorch operations, which cost an
    /// append more than its arithmetic did. `None` where a feature only the libtorch path
    /// computes is on (calendar, session summary, concatenation, positions counted from the
    /// newest event) or a table is not fp32 host memory.
    fn host_last(&self, batch: &Batch, fresh: &[usize]) -> Option<Vec<f32>> {
        let libtorch_only = self.calendar.is_some()
            || self.session_summary.is_some()
            || self.concat_projection.is_some()
            || self.origin != PositionOrigin::WindowStart;
        if libtorch_only {
            return None;
        }
        let items = HostTable::of(&self.items.ws)?;
        let positions = HostTable::of(&self.positions.ws)?;
        let features = [
            (&self.gaps, Field::Gaps),
            (&self.types, Field::Types),
            (&self.prediction_gaps, Field::PredictionGaps),
        ]
        .into_iter()
        .filter_map(|(table, field)| table.as_ref().map(|table| Some((HostTable::of(&table.ws)?, field))))
        .collect::<Option<Vec<_>>>()?;
        let width = batch.seq_len() as usize;
        let mut inputs = Vec::with_capacity(fresh.iter().sum::<usize>() * items.width());
        for (row, &m) in fresh.iter().enumerate() {
            let ids = batch.row_field(Field::Items, row, width);
            // Counted from the window start as `positions` counts them: real events before.
            let mut position = ids[..width - m].iter().filter(|&&id| id != 0).count() as i64;
            for (j, &id) in ids[width - m..].iter().enumerate() {
                let at = inputs.len();
                inputs.extend_from_slice(items.row(id));
                add_into(&mut inputs[at..], positions.row(position));
                for (table, field) in &features {
                    add_into(&mut inputs[at..], table.row(batch.row_field(*field, row, m)[j]));
                }
                position += i64::from(id != 0);
            }
        }
        Some(inputs)
    }

    /// `[B, L]` position indices. Rows are left-padded, so counted from the newest event the
    /// last column is the last position in every row (shorter batches take the last `l`
    /// positions); counted from the window start, a row's first real event is position 0.
    fn positions(&self, batch: &Batch) -> Tensor {
        let (b, l) = (batch.size(), batch.seq_len());
        match self.origin {
            PositionOrigin::Newest => {
                let max_len = self.positions.ws.size()[0];
                let positions = Tensor::arange_start(max_len - l, max_len, (Kind::Int64, batch.device()));
                positions.unsqueeze(0).expand([b, l], false)
            }
            PositionOrigin::WindowStart => (batch.real_mask().cumsum(1, Kind::Int64) - 1).clamp_min(0),
        }
    }
}

/// The calendar of the moment a position predicts, as the sum of an hour-of-day and a
/// day-of-week embedding. One table of all 168 hours of the week cost ml-100k 0.005 NDCG@10
/// (docs/QUALITY.md), where rating times carry little periodic signal: each of its slots sees a
/// 168th of the data. Two small tables see a 24th and a 7th, and a daily or a weekly band is
/// still one table's pattern.
#[derive(Debug)]
struct Calendar {
    hours: nn::Embedding,
    days: nn::Embedding,
}

impl Calendar {
    fn new(p: &nn::Path, d: i64) -> Self {
        Self {
            hours: embedding(p / "calendar_hour_embedding", 1 + HOURS_PER_DAY, d),
            days: embedding(p / "calendar_day_embedding", 1 + DAYS_PER_WEEK, d),
        }
    }

    /// `hours_of_week` as [`hour_of_week`](crate::data::session::hour_of_week) numbers them,
    /// 0 = padding, which maps to each table's padding row 0.
    fn forward(&self, hours_of_week: &Tensor) -> Tensor {
        let (hour, day) = hour_and_day(hours_of_week);
        hour.apply(&self.hours) + day.apply(&self.days)
    }
}

/// Hour of the day (1–24) and day of the week (1 = Monday … 7) of hour-of-week numbers; 0 stays 0.
fn hour_and_day(hours_of_week: &Tensor) -> (Tensor, Tensor) {
    let real = hours_of_week.gt(0).to_kind(Kind::Int64);
    let since_monday = (hours_of_week - 1).clamp_min(0);
    let hour = (since_monday.remainder(HOURS_PER_DAY) + 1) * &real;
    let day = (since_monday.floor_divide_scalar(HOURS_PER_DAY) + 1) * real;
    (hour, day)
}

/// What followed earlier sessions like the current one: for position `i`, a softmax over the
/// events `j` of earlier sessions, by the cosine between `i`'s session so far and the session
/// before `j`'s, of `j`'s item vectors. A cosine below a learned threshold loses to a null slot
/// (value zero), so a position whose session resembles no earlier one (a user's first round of
/// interests) reads nothing rather than a blur of everything. The result lives in item space
/// and is added to the hidden state, scaled by a gate the hidden state sets, so that the
/// encoder decides where "what came next last time" applies (a session start) without having
/// to carry it through its layers.
#[derive(Debug)]
struct SessionSuccessor {
    sharpness: Tensor,
    threshold: Tensor,
    gate: nn::Linear,
}

impl SessionSuccessor {
    fn new(p: &nn::Path, d: i64) -> Self {
        Self {
            sharpness: p.var("sharpness", &[1], nn::Init::Const(10.0)),
            threshold: p.var("threshold", &[1], nn::Init::Const(0.5)),
            gate: zero_gate(p, d),
        }
    }

    /// `[B, m, d]` for the last `m` positions of `batch`.
    fn retrieve(&self, batch: &Batch, items: &Tensor, m: i64) -> Tensor {
        let sessions = &batch.sessions;
        let l = batch.seq_len();
        let kind = items.kind();
        // [B, i, j]: j is in i's session and not after i.
        let causal = Tensor::ones([m, l], (Kind::Bool, items.device()))
            .tril(l - m)
            .unsqueeze(0);
        let so_far = sessions
            .narrow(1, l - m, m)
            .unsqueeze(2)
            .eq_tensor(&sessions.unsqueeze(1))
            .logical_and(&causal)
            .logical_and(&batch.real_mask().unsqueeze(1))
            .to_kind(kind);
        let current = (&so_far / so_far.sum_dim_intlist(-1, true, kind).clamp_min(1.0)).matmul(items);
        // Position j's "before" is the mean of session s_j − 1: compared once per session and
        // read back per position, where comparing a copy per position cost a dozen passes over
        // [B, L, d] (a third of a served bf16 forward).
        let means = session_means(batch, items);
        let before = (sessions - 1).clamp_min(0);
        let has_before = means
            .abs()
            .sum_dim_intlist(-1, false, kind)
            .gt(0.0)
            .gather(1, &before, false)
            .logical_and(&sessions.gt(0));
        let per_session = unit(&current).matmul(&unit(&means).transpose(1, 2));
        let similarity = (per_session.gather(2, &before.unsqueeze(1).expand([-1, m, -1], false), false)
            - &self.threshold)
            * &self.sharpness;
        let allowed = earlier_sessions(batch, m).logical_and(&has_before.unsqueeze(1));
        read_or_nothing(&similarity, &allowed, items)
    }
}

/// What the user did in earlier sessions at a time like the moment of prediction: for position
/// `i`, a softmax over the events `k` of earlier sessions by a learned match between the hour
/// of day and day of week of the moment `i` predicts and those of event `k`, of `k`'s item
/// vectors, beside a null slot, gated into the hidden state like [`SessionSuccessor`]. A daily
/// or weekly habit of one user ("evenings: films, mornings: news") is then one lookup, where a
/// calendar embedding of the input can only learn the habits that many users share.
#[derive(Debug)]
struct ClockReadout {
    query: Calendar,
    key: Calendar,
    gate: nn::Linear,
}

/// Width of the clock readout's query and key embeddings.
const CLOCK_DIM: i64 = 16;

impl ClockReadout {
    fn new(p: &nn::Path, d: i64) -> Self {
        Self {
            query: Calendar::new(&(p / "query"), CLOCK_DIM),
            key: Calendar::new(&(p / "key"), CLOCK_DIM),
            gate: zero_gate(p, d),
        }
    }

    /// `[B, m, d]` for the last `m` positions of `batch`.
    fn retrieve(&self, batch: &Batch, items: &Tensor, m: i64) -> Tensor {
        let (b, l) = (batch.size(), batch.seq_len());
        // Event k happened at the moment position k − 1 predicts; the window's first event
        // has no such position and takes no part (in every batch shape alike).
        let own_hours = Tensor::cat(
            &[
                Tensor::zeros([b, 1], (Kind::Int64, items.device())),
                batch.prediction_hours.narrow(1, 0, l - 1),
            ],
            1,
        );
        let queries = self.query.forward(&batch.prediction_hours.narrow(1, l - m, m));
        let keys = self.key.forward(&own_hours);
        let logits = queries.matmul(&keys.transpose(1, 2)) / (CLOCK_DIM as f64).sqrt();
        let allowed = earlier_sessions(batch, m).logical_and(&own_hours.gt(0).unsqueeze(1));
        read_or_nothing(&logits, &allowed, items)
    }
}

/// `[B, d] → [B, 1]`, zero at initialisation: a readout starts switched off and the hidden state
/// learns where it applies.
fn zero_gate(p: &nn::Path, d: i64) -> nn::Linear {
    let zero = nn::LinearConfig {
        ws_init: nn::Init::Const(0.0),
        bs_init: Some(nn::Init::Const(0.0)),
        bias: true,
    };
    nn::linear(p / "gate", d, 1, zero)
}

/// `hidden + gate(hidden) · read`.
fn gated(hidden: Tensor, gate: &nn::Linear, read: Tensor) -> Tensor {
    let scale = hidden.apply(gate);
    hidden + scale * read
}

/// `[B, i, j]` for `i` among the last `m` positions: `j` is a real event of an earlier session
/// than `i`'s.
fn earlier_sessions(batch: &Batch, m: i64) -> Tensor {
    let sessions = &batch.sessions;
    sessions
        .unsqueeze(1)
        .lt_tensor(&sessions.narrow(1, batch.seq_len() - m, m).unsqueeze(2))
        .logical_and(&batch.real_mask().unsqueeze(1))
}

/// `[B, m, d]`: `items` (`[B, L, d]`) averaged by a softmax of `logits` (`[B, m, L]`) over the
/// allowed `j`, beside a null slot of logit 0 and value zero, so that a query with no good match
/// reads (almost) nothing.
fn read_or_nothing(logits: &Tensor, allowed: &Tensor, items: &Tensor) -> Tensor {
    let (b, m, l) = logits.size3().expect("[B, m, L]");
    let kind = items.kind();
    let logits = logits.masked_fill(&allowed.logical_not(), f64::NEG_INFINITY);
    let null = Tensor::zeros([b, m, 1], (kind, items.device()));
    let weights = Tensor::cat(&[null, logits], -1).softmax(-1, kind);
    weights.narrow(-1, 1, l).matmul(items)
}

fn unit(x: &Tensor) -> Tensor {
    x / x.norm_scalaropt_dim(2.0, [-1], true).clamp_min(1e-6)
}

/// `[B, L, d]`: for each position, the mean of `items` over the real positions of the session
/// before its own (zero in the window's first session). Only earlier events take part, so the
/// model stays causal and a served window gives the same value as the offline one. Sums per
/// session index (which is below L) and reads them back: O(L·d) per row, where comparing every
/// pair of positions would cost O(L²·d).
fn previous_session_mean(batch: &Batch, items: &Tensor) -> Tensor {
    let sessions = &batch.sessions;
    let before = (sessions - 1).clamp_min(0).unsqueeze(-1).expand_as(items);
    let has_before = sessions.gt(0).unsqueeze(-1).to_kind(items.kind());
    session_means(batch, items).gather(1, &before, false) * has_before
}

/// `[B, S, d]`: per row, the mean of `items` over the real positions of each session index
/// `0 .. S` (zero for an index with none), S one past the batch's largest session index.
fn session_means(batch: &Batch, items: &Tensor) -> Tensor {
    let sessions = &batch.sessions;
    let count = batch.host_sessions().iter().max().map_or(1, |&last| last + 1);
    let real = batch.real_mask().to_kind(items.kind());
    let (b, _, d) = items.size3().expect("[B, L, d]");
    let by_session = sessions.unsqueeze(-1).expand_as(items);
    let sums = Tensor::zeros([b, count, d], (items.kind(), items.device())).scatter_add(
        1,
        &by_session,
        &(items * real.unsqueeze(-1)),
    );
    let counts = Tensor::zeros([b, count], (items.kind(), items.device()))
        .scatter_add(1, sessions, &real)
        .clamp_min(1.0);
    sums / counts.unsqueeze(-1)
}

#[derive(Debug)]
struct TransformerBlock {
    attn_norm: nn::LayerNorm,
    qkv: nn::Linear,
    attn_out: nn::Linear,
    ffn_norm: nn::LayerNorm,
    ffn_in: nn::Linear,
    ffn_out: nn::Linear,
    n_heads: i64,
    dropout: Dropout,
}

impl TransformerBlock {
    fn new(p: &nn::Path, cfg: &ModelConfig, masks: &Arc<MaskSource>) -> Self {
        let (d, ffn) = (cfg.d_model as i64, cfg.ffn_dim as i64);
        Self {
            attn_norm: nn::layer_norm(p / "attn_norm", vec![d], Default::default()),
            qkv: linear(p / "qkv", d, 3 * d),
            attn_out: linear(p / "attn_out", d, d),
            ffn_norm: nn::layer_norm(p / "ffn_norm", vec![d], Default::default()),
            ffn_in: linear(p / "ffn_in", d, ffn),
            ffn_out: linear(p / "ffn_out", ffn, d),
            n_heads: cfg.n_heads as i64,
            dropout: Dropout::new(cfg.dropout, masks),
        }
    }

    /// The queries of the last `m` positions of `normed` (`[B, m, H, head_dim]`) and the keys
    /// and values of all of them (`[B, L, 2, H, head_dim]`): one product with the whole
    /// projection where every position is an output, else the queries' rows apart, so that
    /// the final layer of an inference pass projects one query rather than the window's.
    fn project(&self, normed: &Tensor, m: i64) -> (Tensor, Tensor) {
        let (b, l, d) = normed.size3().expect("[B, L, d]");
        let (heads, head_dim) = (self.n_heads, d / self.n_heads);
        if m == l {
            let qkv = normed.apply(&self.qkv).view([b, l, 3, heads, head_dim]);
            return (qkv.select(2, 0), qkv.narrow(2, 1, 2));
        }
        let rows = |first: i64, count: i64| {
            let bias = self.qkv.bs.as_ref().map(|bias| bias.narrow(0, first, count));
            (self.qkv.ws.narrow(0, first, count), bias)
        };
        let (weight, bias) = rows(0, d);
        let q = normed.narrow(1, l - m, m).linear(&weight, bias.as_ref());
        let (weight, bias) = rows(d, 2 * d);
        let kv = normed.linear(&weight, bias.as_ref());
        (q.view([b, m, heads, head_dim]), kv.view([b, l, 2, heads, head_dim]))
    }

    /// Pre-LayerNorm block over `x` (`[B, L, d]`). With `cached`, `x`'s positions follow a
    /// prefix whose keys and values are in that buffer: this layer writes its own beside them
    /// and attends to all. `attn_bias` is `[B, H|1, L, P + L]`, −inf where attention is not
    /// allowed. With `capture`, attention is computed explicitly and its weights are pushed
    /// there; the fused kernel is used otherwise. Both give the same output.
    ///
    /// Only the last `outputs` positions are computed past the keys and values (all of them
    /// when `None`): the final layer of an inference pass needs the newest position alone, and
    /// its queries, attention output and feed-forward for the others were over 40 % of the pass.
    fn forward(
        &self,
        x: &Tensor,
        cached: Option<&LayerStates>,
        attn_bias: &Tensor,
        train: bool,
        capture: Option<&mut Vec<Tensor>>,
        outputs: Option<i64>,
    ) -> Tensor {
        let (b, l, d) = x.size3().expect("[B, L, d]");
        let head_dim = d / self.n_heads;
        let heads_first = |t: Tensor| t.transpose(1, 2);
        let m = outputs.unwrap_or(l).min(l);
        let (q, kv) = self.project(&x.apply(&self.attn_norm), m);
        let (x, attn_bias) = match m < l {
            true => (x.narrow(1, l - m, m), attn_bias.narrow(2, l - m, m)),
            false => (x.shallow_clone(), attn_bias.shallow_clone()),
        };
        let q = heads_first(q);
        let (k, v) = match cached {
            None => (heads_first(kv.select(2, 0)), heads_first(kv.select(2, 1))),
            Some(LayerStates {
                states,
                layer,
                prefix_len,
            }) => {
                states.narrow(1, *prefix_len, l).narrow(2, 2 * layer, 2).copy_(&kv);
                (
                    heads_first(states.select(2, 2 * layer)),
                    heads_first(states.select(2, 2 * layer + 1)),
                )
            }
        };
        // Dropout on the attention weights needs them in hand, as capturing does; the fused
        // kernel serves every other pass.
        let attended = if capture.is_none() && !(train && self.dropout.is_active()) {
            causal_attention(&q, &k, &v, &attn_bias)
        } else {
            let logits = q.matmul(&k.transpose(-2, -1)) / (head_dim as f64).sqrt() + &attn_bias;
            let weights = logits.softmax(-1, logits.kind());
            let out = self.dropout.apply(&weights, train).matmul(&v);
            if let Some(weights_out) = capture {
                weights_out.push(weights);
            }
            out
        };
        let attended = attended.transpose(1, 2).reshape([b, m, d]).apply(&self.attn_out);
        let x = x + self.dropout.apply(&attended, train);
        let ffn = x.apply(&self.ffn_norm).apply(&self.ffn_in).gelu("none");
        let ffn = self.dropout.apply(&ffn, train).apply(&self.ffn_out);
        &x + self.dropout.apply(&ffn, train)
    }
}

/// Queries per call of the fused attention kernel on the host (see [`causal_attention`]).
const QUERY_CHUNK: i64 = 32;

/// The fused kernel's attention of `q` (`[B, H, m, hd]`, the last `m` of the keys' positions)
/// to `k`, `v` (`[B, H, K, hd]`) under `bias` (`[B, H|1, m, K]`). On the host the queries go in
/// chunks, each reading only the keys up to its last query: the bias blocks every later key
/// for all of its queries, so they add nothing, and the kernel would still multiply them. For
/// 32 × 200 positions the kernel took 27 % less time in bf16 and 14 % in fp32 (the same
/// libtorch timed from Python, docs/BENCHMARKS.md). Elsewhere one call (unmeasured on a GPU,
/// where each call is a launch).
fn causal_attention(q: &Tensor, k: &Tensor, v: &Tensor, bias: &Tensor) -> Tensor {
    let attend = |q: &Tensor, k: &Tensor, v: &Tensor, bias: &Tensor| {
        Tensor::scaled_dot_product_attention(q, k, v, Some(bias), 0.0, false, None, false)
    };
    let (m, keys) = (q.size()[2], k.size()[2]);
    if q.device() != Device::Cpu || m <= QUERY_CHUNK {
        return attend(q, k, v, bias);
    }
    let chunks: Vec<Tensor> = (0..m)
        .step_by(QUERY_CHUNK as usize)
        .map(|first| {
            let queries = QUERY_CHUNK.min(m - first);
            let visible = keys - m + first + queries;
            attend(
                &q.narrow(2, first, queries),
                &k.narrow(2, 0, visible),
                &v.narrow(2, 0, visible),
                &bias.narrow(2, first, queries).narrow(3, 0, visible),
            )
        })
        .collect();
    Tensor::cat(&chunks, 2)
}

/// One layer's view of a batch's keys and values as [`PrefixPool::gather`] lays them out
/// (`[B, P + m, 2 × layers, H, head_dim]`): the prefix's in the first `prefix_len` positions,
/// the new positions' written after them by the layer itself.
struct LayerStates<'a> {
    states: &'a Tensor,
    layer: i64,
    prefix_len: i64,
}

#[derive(Debug)]
struct Transformer {
    blocks: Vec<TransformerBlock>,
    session_bias: Option<nn::Embedding>,
    session_cap: i64,
    final_norm: nn::LayerNorm,
}

impl Transformer {
    fn new(p: &nn::Path, cfg: &ModelConfig, masks: &Arc<MaskSource>) -> Self {
        let cap = cfg.features.session_cap as i64;
        let blocks = (0..cfg.n_layers)
            .map(|i| TransformerBlock::new(&(p / format!("block{i}")), cfg, masks))
            .collect();
        let session_bias = cfg.features.session_recency.then(|| {
            nn::embedding(
                p / "session_bias",
                cap + 1,
                cfg.n_heads as i64,
                nn::EmbeddingConfig {
                    ws_init: nn::Init::Const(0.0),
                    ..Default::default()
                },
            )
        });
        Self {
            blocks,
            session_bias,
            session_cap: cap,
            final_norm: nn::layer_norm(p / "final_norm", vec![cfg.d_model as i64], Default::default()),
        }
    }

    /// `[B, H|1, Q, K]` additive attention bias of queries that are the last Q of each row's
    /// K keys (the first K − Q may be a cached prefix), given the keys' session indices and
    /// whether each may be read (`[B × K]`, row after row): causal, only to allowed keys (a
    /// query may always read itself, so that no row is empty: padding attends to itself
    /// only), plus the session-recency bias by the sessions between key and query.
    ///
    /// Built on the host: for the few queries of an append, a dozen masking ops on the device
    /// would cost more than the pass's arithmetic. Where gradients must reach the bias table
    /// (`differentiable`, training), the host builds the index into the table and the device
    /// looks it up; otherwise the host writes the values themselves, a run of keys at a time
    /// (the table is a handful of rows): for a full window of 32 × 200 events the lookup of
    /// 1.28 M indices and its transposed copy took more than the host's fill (docs/BENCHMARKS.md).
    fn attention_bias(
        &self,
        key_sessions: &[i64],
        key_allowed: &[bool],
        keys: usize,
        queries: usize,
        differentiable: bool,
    ) -> Tensor {
        let table = self.bias_table();
        let (table_rows, heads) = (table.size()[0] as usize, table.size()[1] as usize);
        let rows = key_allowed.len() / keys;
        let shape = [rows as i64, queries as i64, keys as i64];
        if differentiable {
            let mut index = Vec::with_capacity(rows * queries * keys);
            self.bias_runs(
                key_sessions,
                key_allowed,
                keys,
                queries,
                table_rows - 1,
                |len, table_row| index.extend(std::iter::repeat_n(table_row as i64, len)),
            );
            let index = Tensor::from_slice(&index).view(shape);
            return Tensor::embedding(&table, &to_device_pinned(index, table.device()), -1, false, false)
                .permute([0, 3, 1, 2]);
        }
        let size = [rows as i64, heads as i64, queries as i64, keys as i64];
        let values = to_host_f32(&table);
        let bias = match table.kind() {
            // The table's values are bf16 already: their upper halves are exact.
            Kind::BFloat16 => {
                let bits: Vec<u16> = values.iter().map(|v| (v.to_bits() >> 16) as u16).collect();
                self.bias_values(size, Kind::BFloat16, &bits, key_sessions, key_allowed)
            }
            kind => self
                .bias_values(size, Kind::Float, &values, key_sessions, key_allowed)
                .to_kind(kind),
        };
        to_device_pinned(bias, table.device())
    }

    /// The bias of [`Self::attention_bias`] as a host tensor of `size` (`[B, H, Q, K]`) and
    /// `kind`, whose elements are `T`, from the table's `values` (`[rows, H]`): each run of
    /// keys written once per head, straight into the tensor.
    fn bias_values<T: Copy>(
        &self,
        size: [i64; 4],
        kind: Kind,
        values: &[T],
        key_sessions: &[i64],
        key_allowed: &[bool],
    ) -> Tensor {
        let [_, heads, queries, keys] = size.map(|n| n as usize);
        let bias = Tensor::empty(size, (kind, Device::Cpu));
        assert_eq!(bias.kind().elt_size_in_bytes(), std::mem::size_of::<T>());
        // SAFETY: the tensor is fresh, contiguous, not shared, and holds `numel` elements of
        // `kind`, whose size `T` has.
        let out = unsafe { std::slice::from_raw_parts_mut(bias.data_ptr() as *mut T, bias.numel()) };
        let plane = queries * keys;
        let mut at = 0;
        let blocked = values.len() / heads - 1;
        self.bias_runs(key_sessions, key_allowed, keys, queries, blocked, |len, table_row| {
            let (row, within) = (at / plane, at % plane);
            for head in 0..heads {
                let start = (row * heads + head) * plane + within;
                out[start..start + len].fill(values[table_row * heads + head]);
            }
            at += len;
        });
        bias
    }

    /// Walks the bias of every query of every row (row after row, query after query, key
    /// after key) as runs of keys that read one row of the bias table: `visit(len, row)`,
    /// `blocked` being the row of keys that may not be read. Runs follow each row's runs of
    /// keys alike in session and readability, so a window of few sessions is a few runs.
    fn bias_runs(
        &self,
        key_sessions: &[i64],
        key_allowed: &[bool],
        keys: usize,
        queries: usize,
        blocked: usize,
        mut visit: impl FnMut(usize, usize),
    ) {
        let mut alike = Vec::new();
        for (sessions, allowed) in key_sessions.chunks(keys).zip(key_allowed.chunks(keys)) {
            alike.clear();
            let mut start = 0;
            for key in 1..=keys {
                if key == keys || allowed[key] != allowed[start] || sessions[key] != sessions[start] {
                    alike.push((start, key));
                    start = key;
                }
            }
            for query in keys - queries..keys {
                for &(start, end) in alike.iter().take_while(|(start, _)| *start < query) {
                    let table_row = match (allowed[start], &self.session_bias) {
                        (false, _) => blocked,
                        // Sessions between key and query, seen from the query: 0 = its own session.
                        (true, Some(_)) => (sessions[query] - sessions[start]).clamp(0, self.session_cap) as usize,
                        (true, None) => 0,
                    };
                    visit(end.min(query) - start, table_row);
                }
                // A query reads itself (its own session: row 0), and nothing after it.
                visit(1, 0);
                if query + 1 < keys {
                    visit(keys - query - 1, blocked);
                }
            }
        }
    }

    /// `[rows, H|1]` attention bias by session distance (zero without the session-recency
    /// feature), then one row of −inf for a key that may not be read.
    fn bias_table(&self) -> Tensor {
        let by_distance = match &self.session_bias {
            Some(table) => table.ws.shallow_clone(),
            None => {
                let weights = &self.blocks[0].qkv.ws;
                Tensor::zeros([1, 1], (weights.kind(), weights.device()))
            }
        };
        let blocked = Tensor::full(
            [1, by_distance.size()[1]],
            f64::NEG_INFINITY,
            (by_distance.kind(), by_distance.device()),
        );
        Tensor::cat(&[by_distance, blocked], 0)
    }

    /// The weights on the host, for appends there ([`HostTransformer`]).
    fn host_copy(&self) -> HostTransformer {
        let blocks = self
            .blocks
            .iter()
            .map(|b| BlockWeights {
                attn_norm: &b.attn_norm,
                qkv: &b.qkv,
                attn_out: &b.attn_out,
                ffn_norm: &b.ffn_norm,
                ffn_in: &b.ffn_in,
                ffn_out: &b.ffn_out,
            })
            .collect();
        HostTransformer::new(
            blocks,
            &self.final_norm,
            self.session_bias.as_ref().map(|table| &table.ws),
            self.session_cap,
            self.blocks[0].n_heads as usize,
        )
    }

    /// The last `outputs` positions' states (every position's when `None`).
    fn forward(
        &self,
        x: Tensor,
        batch: &Batch,
        train: bool,
        mut capture: Option<&mut Vec<Tensor>>,
        outputs: Option<i64>,
    ) -> Tensor {
        let l = batch.seq_len();
        let allowed: Vec<bool> = batch
            .lengths
            .iter()
            .flat_map(|&len| (0..l).map(move |column| column >= l - len))
            .collect();
        // The fused kernel wants the bias in the activations' precision (bf16 inference).
        let bias = self
            .attention_bias(batch.host_sessions(), &allowed, l as usize, l as usize, train)
            .to_kind(x.kind());
        let mut x = x;
        for (index, block) in self.blocks.iter().enumerate() {
            let last = index + 1 == self.blocks.len();
            x = block.forward(&x, None, &bias, train, capture.as_deref_mut(), outputs.filter(|_| last));
        }
        x.apply(&self.final_norm)
    }

    /// The forward pass of `x` (`[B, m, d]`), positions that follow a prefix whose keys and
    /// values are the first `prefix_len` of `states` (from [`PrefixPool::gather`]); every
    /// layer writes the keys and values of `x`'s positions after them. Returns the hidden
    /// states.
    fn extend(&self, x: Tensor, bias: &Tensor, states: &Tensor, prefix_len: i64) -> Tensor {
        let mut x = x;
        for (layer, block) in self.blocks.iter().enumerate() {
            let cached = LayerStates {
                states,
                layer: layer as i64,
                prefix_len,
            };
            x = block.forward(&x, Some(&cached), bias, false, None, None);
        }
        x.apply(&self.final_norm)
    }
}

/// A stacked LSTM over libtorch's fused kernel. tch's `nn::LSTM` fixes train mode (and so
/// inter-layer dropout) at construction; inference must run without it.
#[derive(Debug)]
struct Lstm {
    /// Per layer: input-hidden and hidden-hidden weights and biases, in libtorch's order.
    weights: Vec<Tensor>,
    layers: i64,
    hidden_dim: i64,
    dropout: f64,
    final_norm: nn::LayerNorm,
}

impl Lstm {
    fn new(p: &nn::Path, cfg: &ModelConfig) -> Self {
        let d = cfg.d_model as i64;
        let bound = 1.0 / (d as f64).sqrt();
        let init = nn::Init::Uniform { lo: -bound, up: bound };
        let mut weights = Vec::new();
        for layer in 0..cfg.n_layers {
            weights.push(p.var(&format!("weight_ih_l{layer}"), &[4 * d, d], init));
            weights.push(p.var(&format!("weight_hh_l{layer}"), &[4 * d, d], init));
            weights.push(p.var(&format!("bias_ih_l{layer}"), &[4 * d], init));
            weights.push(p.var(&format!("bias_hh_l{layer}"), &[4 * d], init));
        }
        Self {
            weights,
            layers: cfg.n_layers as i64,
            hidden_dim: d,
            dropout: cfg.dropout,
            final_norm: nn::layer_norm(p / "norm", vec![d], Default::default()),
        }
    }

    fn forward(&self, x: &Tensor, train: bool) -> Tensor {
        let state = Tensor::zeros([self.layers, x.size()[0], self.hidden_dim], (x.kind(), x.device()));
        let (out, _, _) = x.lstm(
            &[&state, &state],
            &self.weights.iter().collect::<Vec<_>>(),
            true,
            self.layers,
            self.dropout,
            train,
            false,
            true,
        );
        out.apply(&self.final_norm)
    }
}

#[derive(Debug)]
enum Encoder {
    Transformer(Transformer),
    Lstm(Lstm),
}

/// Input embedding → sequence encoder → scores against the item table.
#[derive(Debug)]
pub struct Network {
    input: InputEmbedding,
    encoder: Encoder,
    successor: Option<SessionSuccessor>,
    clock: Option<ClockReadout>,
    repeat: Option<nn::Linear>,
    output_items: Option<nn::Embedding>,
    masks: Arc<MaskSource>,
}

impl Network {
    pub fn new(p: &nn::Path, cfg: &ModelConfig) -> Self {
        let d = cfg.d_model as i64;
        let masks = Arc::new(MaskSource::default());
        let encoder = match cfg.arch {
            Arch::Transformer => Encoder::Transformer(Transformer::new(&(p / "transformer"), cfg, &masks)),
            Arch::Lstm => Encoder::Lstm(Lstm::new(&(p / "lstm"), cfg)),
        };
        let output_items = (!cfg.tied_output).then(|| embedding(p / "output_embedding", cfg.num_items as i64, d));
        Self {
            input: InputEmbedding::new(p, cfg, &masks),
            encoder,
            successor: (cfg.features.session_successor).then(|| SessionSuccessor::new(&(p / "session_successor"), d)),
            clock: cfg
                .features
                .clock_readout
                .then(|| ClockReadout::new(&(p / "clock_readout"), d)),
            repeat: cfg.features.repeat_term.then(|| zero_gate(&(p / "repeat_term"), d)),
            output_items,
            masks,
        }
    }

    /// Restarts the dropout masks of training passes from `seed` (the LSTM's inter-layer
    /// dropout draws from libtorch's generator, see `tch::manual_seed`).
    pub fn reseed_dropout(&self, seed: u64) {
        self.masks.reseed(seed);
    }

    /// `[B, L, d]` hidden states; position `j` summarises events up to `j`.
    pub fn hidden(&self, batch: &Batch, train: bool) -> Tensor {
        self.hidden_with_attention(batch, train, None)
    }

    /// Like [`Self::hidden`], also collecting per-layer attention weights `[B, H, L, L]` when
    /// `capture` is given (Transformer only).
    pub fn hidden_with_attention(&self, batch: &Batch, train: bool, capture: Option<&mut Vec<Tensor>>) -> Tensor {
        let hidden = self.encoded(batch, train, capture, None);
        self.read_out(hidden, batch)
    }

    /// `[B, d]`: the hidden state at each row's newest position (inference mode), with the
    /// readouts read for that position alone: [`Self::read_clock`] of [`Self::last_state`], with
    /// one lookup of the window's items for both readouts.
    pub fn last_hidden(&self, batch: &Batch) -> Tensor {
        let hidden = self.encoded(batch, false, None, Some(1));
        let l = hidden.size()[1];
        self.read_out(hidden.narrow(1, l - 1, 1), batch).squeeze_dim(1)
    }

    /// `[B, d]`: each row's newest state before the clock readout. The clock readout is the one
    /// part of the model past its input that reads the hour of the moment of prediction, so
    /// this state stays valid while the hour changes and an inference cache may keep it
    /// ([`moment_key`](super::input::moment_key)).
    pub fn last_state(&self, batch: &Batch) -> Tensor {
        let hidden = self.encoded(batch, false, None, Some(1));
        let l = hidden.size()[1];
        self.read_successor_of(hidden.narrow(1, l - 1, 1), batch, None)
            .squeeze_dim(1)
    }

    /// `states` (`[B, d]`, [`Self::last_state`] of the same rows, in any precision) with the
    /// clock readout of each row's newest position added, in the model's precision.
    pub fn read_clock(&self, states: Tensor, batch: &Batch) -> Tensor {
        let states = states.to_kind(self.input.items.ws.kind()).unsqueeze(1);
        self.read_clock_of(states, batch, None).squeeze_dim(1)
    }
    /// `[B, L, d]` encoder states, before the readouts: of the last `outputs` positions alone
    /// where the encoder can skip the others (`[B, outputs, d]`).
    fn encoded(&self, batch: &Batch, train: bool, capture: Option<&mut Vec<Tensor>>, outputs: Option<i64>) -> Tensor {
        let x = self.input.forward(batch, train);
        match &self.encoder {
            Encoder::Transformer(t) => t.forward(x, batch, train, capture, outputs),
            Encoder::Lstm(lstm) => lstm.forward(&x, train),
        }
    }

    /// `hidden`, the states of the last `m` positions of `batch` (`[B, m, d]`), with the
    /// enabled readouts added (one lookup of the window's items for both).
    fn read_out(&self, hidden: Tensor, batch: &Batch) -> Tensor {
        let items = (self.successor.is_some() || self.clock.is_some()).then(|| self.window_items(batch));
        let hidden = self.read_successor_of(hidden, batch, items.as_ref());
        self.read_clock_of(hidden, batch, items.as_ref())
    }

    /// `[B, L, d]`: the input vectors of the window's items, which the readouts read.
    fn window_items(&self, batch: &Batch) -> Tensor {
        batch.items.apply(&self.input.items)
    }

    /// The successor readout added to `hidden` (`[B, m, d]`), reading `items` when given
    /// ([`Self::window_items`]).
    fn read_successor_of(&self, hidden: Tensor, batch: &Batch, items: Option<&Tensor>) -> Tensor {
        let Some(successor) = &self.successor else {
            return hidden;
        };
        let items = items.map_or_else(|| self.window_items(batch), Tensor::shallow_clone);
        let m = hidden.size()[1];
        gated(hidden, &successor.gate, successor.retrieve(batch, &items, m))
    }

    /// The clock readout added to `hidden` (`[B, m, d]`), reading `items` when given.
    fn read_clock_of(&self, hidden: Tensor, batch: &Batch, items: Option<&Tensor>) -> Tensor {
        let Some(clock) = &self.clock else { return hidden };
        let items = items.map_or_else(|| self.window_items(batch), Tensor::shallow_clone);
        let m = hidden.size()[1];
        gated(hidden, &clock.gate, clock.retrieve(batch, &items, m))
    }

    /// A pool of prefixes to extend from, in at most `budget` bytes, stored as `storage`; `None` where
    /// appending is not exact: the LSTM, and positions counted from the newest event (an
    /// append moves them all).
    pub fn prefix_pool(&self, budget: usize, storage: Kind) -> Option<PrefixPool> {
        let transformer = self.appendable()?;
        let table = &self.input.items.ws;
        let heads = transformer.blocks[0].n_heads;
        let head_dim = table.size()[1] / heads;
        let states = 2 * transformer.blocks.len() as i64;
        let max_len = self.input.positions.ws.size()[0] as usize;
        let pool = PrefixPool::new(budget, max_len, [states, heads, head_dim], storage, table.device());
        Some(match table.device() == Device::Cpu && table.kind() == Kind::Float {
            true => pool.with_host_kernel(transformer.host_copy()),
            false => pool,
        })
    }

    /// Whether [`Self::extend`] is exact for this model (see [`Self::prefix_pool`]).
    pub fn can_append(&self) -> bool {
        self.appendable().is_some()
    }

    fn appendable(&self) -> Option<&Transformer> {
        match &self.encoder {
            Encoder::Transformer(transformer) if self.input.origin == PositionOrigin::WindowStart => Some(transformer),
            _ => None,
        }
    }

    /// `[B, d]`: [`Self::last_state`], computing only the positions after the prefix held in
    /// `slots[row]` of `pool` (that row's first positions, from an earlier call on the same
    /// window; an empty slot computes them all); and each slot grown to all its row's
    /// positions but the newest, whose input depends on the moment of prediction. Equal to
    /// `last_state(batch)` up to float rounding (and the storage precision). Passes of at most [`SHORT_APPEND`] new positions per row run on the
    /// pool's host kernel where it has one. `None` where [`Self::prefix_pool`] is.
    pub fn extend(&self, batch: &Batch, pool: &mut PrefixPool, slots: &[&Slot]) -> Option<Tensor> {
        let transformer = self.appendable()?;
        assert_eq!(slots.len() as i64, batch.size(), "one slot per row");
        let fresh: Vec<usize> = batch
            .lengths
            .iter()
            .zip(slots)
            .map(|(&len, slot)| {
                let held = pool.len(slot);
                assert!((held as i64) < len, "a row must have a position after its prefix");
                len as usize - held
            })
            .collect();
        let m = fresh.iter().copied().max().unwrap_or(1);
        if pool.on_host() && m <= SHORT_APPEND {
            let inputs = self.input.host_last(batch, &fresh).unwrap_or_else(|| {
                // Each row's own new positions out of the `[B, m, d]` libtorch computes.
                let x = to_host_f32(&self.input.forward_last(batch, m as i64, false));
                let d = x.len() / (slots.len() * m);
                x.chunks(m * d)
                    .zip(&fresh)
                    .flat_map(|(row, &fresh)| &row[(m - fresh) * d..])
                    .copied()
                    .collect()
            });
            let d = inputs.len() / fresh.iter().sum::<usize>();
            let mut rows = Vec::with_capacity(slots.len());
            let mut rest = inputs.as_slice();
            for &fresh in &fresh {
                let (row, after) = rest.split_at(fresh * d);
                rows.push(row);
                rest = after;
            }
            let sessions: Vec<&[i64]> = (0..slots.len())
                .map(|row| batch.row_sessions(row, fresh[row]))
                .collect();
            let newest = pool.extend_on_host(slots, &rows, &sessions).expect("a host pool");
            let newest = Tensor::from_slice(&newest).view([slots.len() as i64, 1, d as i64]);
            return Some(self.read_successor_of(newest, batch, None).squeeze_dim(1));
        }
        let x = self.input.forward_last(batch, m as i64, false);
        let prefix_len = slots.iter().map(|slot| pool.len(slot)).max().unwrap_or(0);
        // Each row's keys: its prefix, right-padded to the longest, then the batch's `m` new
        // positions, of which the row's own are the last `fresh[row]`.
        let keys = prefix_len + m;
        let (mut key_sessions, mut key_allowed) = (Vec::with_capacity(slots.len() * keys), Vec::new());
        for (row, (slot, &fresh)) in slots.iter().zip(&fresh).enumerate() {
            let held = pool.sessions(slot);
            key_sessions.extend(held.iter().copied().chain(std::iter::repeat(0)).take(prefix_len));
            key_sessions.extend_from_slice(batch.row_sessions(row, m));
            key_allowed.extend((0..prefix_len).map(|key| key < held.len()));
            key_allowed.extend((0..m).map(|new| new >= m - fresh));
        }
        let bias = transformer
            .attention_bias(&key_sessions, &key_allowed, keys, m, false)
            .to_kind(x.kind());
        let states = pool.gather(slots, m as i64, x.kind());
        let hidden = transformer.extend(x, &bias, &states, prefix_len as i64);
        // The successor readout of the newest position only, as `last_state` reads it.
        let newest = self
            .read_successor_of(hidden.narrow(1, m as i64 - 1, 1), batch, None)
            .squeeze_dim(1);
        // Every new position but the newest joins the prefix.
        let starts: Vec<i64> = fresh.iter().map(|&fresh| (prefix_len + m - fresh) as i64).collect();
        let kept: Vec<&[i64]> = (0..slots.len())
            .map(|row| {
                let own = batch.row_sessions(row, fresh[row]);
                &own[..own.len() - 1]
            })
            .collect();
        pool.append(slots, &states, &starts, &kept);
        Some(newest)
    }

    /// `[V, d]` table that hidden states are scored against.
    pub fn item_table(&self) -> &Tensor {
        &self.output_items.as_ref().unwrap_or(&self.input.items).ws
    }

    /// Scores of every item for each hidden state: `[..., d]` → `[..., V]`, without the repeat
    /// term (see [`Self::score_next`]).
    pub fn score(&self, hidden: &Tensor) -> Tensor {
        hidden.matmul(&self.item_table().tr())
    }

    /// `[N]`: what the repeat term adds to the score of each item the user of each of the
    /// `[N, d]` hidden states had before it (the whole history, not only the window); `None`
    /// for a model without the term.
    pub fn repeat_offsets(&self, hidden: &Tensor) -> Option<Tensor> {
        self.repeat.as_ref().map(|gate| hidden.apply(gate).squeeze_dim(-1))
    }

    /// `[B, V]` scores of the next item from each row's `[B, d]` newest hidden state, the repeat
    /// term added to the items the row's user had, `held` (`[B, W]`, padding 0, repeats allowed).
    pub fn score_next(&self, hidden: &Tensor, held: &Tensor) -> Tensor {
        let scores = self.score(hidden);
        match self.repeat_offsets(hidden) {
            Some(offsets) => add_to_items(scores, held, &offsets),
            None => scores,
        }
    }

    /// `[N, V]` training logits of the `[N, d]` hidden states, the repeat term added at
    /// `(rows, columns)`, the items each state's user had up to it.
    pub fn score_with_repeats(&self, hidden: &Tensor, rows: &[i64], columns: &[i64]) -> Tensor {
        let logits = self.score(hidden);
        let Some(offsets) = self.repeat_offsets(hidden) else {
            return logits;
        };
        let device = logits.device();
        let (rows, columns) = (
            Tensor::from_slice(rows).to_device(device),
            Tensor::from_slice(columns).to_device(device),
        );
        let added = offsets.index_select(0, &rows).to_kind(logits.kind());
        let mut logits = logits;
        // In place, as the seen-item mask: a copy of the logits is a pass over `[N, V]`.
        let _ = logits.index_put_(&[Some(rows), Some(columns)], &added, true);
        logits
    }
}

/// `scores` (`[B, V]`) with `offsets[b]` added once to each distinct item of row `b` of `items`
/// (`[B, W]`, padding 0 left as it is).
pub fn add_to_items(scores: Tensor, items: &Tensor, offsets: &Tensor) -> Tensor {
    let added = offsets.unsqueeze(1) * items.ne(0).to_kind(offsets.kind());
    // A repeated item is written twice with the same value: added once.
    let raised = scores.gather(1, items, false) + added.to_kind(scores.kind());
    scores.scatter(1, items, &raised)
}

#[cfg(test)]
mod tests {
    use tch::Device;

    use super::*;
    use crate::model::{EncodedSeq, Features};

    /// A one-row batch of these items and session indices, every other feature zero.
    fn items_in_sessions(items: Vec<i64>, sessions: Vec<i64>) -> Batch {
        let n = items.len();
        let row = EncodedSeq {
            items,
            types: vec![0; n],
            gaps: vec![0; n],
            prediction_gaps: vec![0; n],
            sessions,
            prediction_hours: vec![0; n],
        };
        Batch::new(&[row], Device::Cpu)
    }

    #[test]
    fn previous_session_mean_averages_the_real_events_of_the_session_before() {
        // Padding shares session index 0 with the window's first session and must not count.
        let batch = items_in_sessions(vec![0, 1, 2, 3, 4, 5], vec![0, 0, 0, 1, 1, 2]);
        let vectors = batch.items.to_kind(Kind::Float).unsqueeze(-1) * Tensor::from_slice(&[1.0f32, 10.0]);
        let mean = Vec::<f32>::try_from(previous_session_mean(&batch, &vectors).view(-1)).unwrap();
        let expected = [
            0.0, 0.0, // padding
            0.0, 0.0, // first session: nothing before it in the window
            0.0, 0.0, 1.5, 15.0, // session 1 reads items 1 and 2
            1.5, 15.0, 3.5, 35.0, // session 2 reads items 3 and 4
        ];
        assert_eq!(mean, expected);
    }

    #[test]
    fn the_successor_reads_what_followed_the_earlier_session_that_matches_the_current_one() {
        // Sessions A A | B B | A | A: the session after the earlier A session is B. The window's
        // first session has nothing before it and takes no part; the A session after B does not
        // match an A session (cosine 0, below the threshold) and nearly loses to the null slot.
        let batch = items_in_sessions(vec![1, 1, 2, 2, 1, 1], vec![0, 0, 1, 1, 2, 3]);
        let (a, b) = ([1.0f32, 0.0], [0.0f32, 1.0]);
        let vectors: Vec<f32> = [a, a, b, b, a, a].concat();
        let vectors = Tensor::from_slice(&vectors).view([1, 6, 2]);
        let vs = nn::VarStore::new(Device::Cpu);
        let successor = SessionSuccessor::new(&vs.root(), 2);
        let read = Vec::<f32>::try_from(tch::no_grad(|| successor.retrieve(&batch, &vectors, 6)).view(-1)).unwrap();
        // Sharpness 10 and threshold 0.5 at initialisation: a match scores +5, a miss −5, null 0.
        let (hit, miss) = (5f32.exp(), (-5f32).exp());
        let expected = [
            0.0,
            0.0,
            0.0,
            0.0, // the first session: no earlier session
            0.0,
            0.0,
            0.0,
            0.0, // B: only the first session is earlier, and it has no predecessor
            0.0,
            2.0 * hit / (1.0 + 2.0 * hit), // A after B: the B session follows an A session
            miss / (1.0 + 2.0 * hit + miss),
            2.0 * hit / (1.0 + 2.0 * hit + miss),
        ];
        for (got, want) in read.iter().zip(expected) {
            assert!((got - want).abs() < 1e-6, "{read:?} vs {expected:?}");
        }
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(48))]
        /// Both ways of building the attention bias (values written by the host; indices looked
        /// up on the device, for training) give, for every row, query and key, what the rule
        /// says element by element: random session indices (not always increasing, as a cached
        /// prefix right-padded with session 0 is not), random readable keys, a cached prefix
        /// (queries fewer than keys), with and without the session-recency table.
        #[test]
        fn the_attention_bias_is_the_rule_applied_to_each_key(
            seed in 0i64..1_000_000,
            rows in 1usize..4,
            keys in 1usize..24,
            queries_cut in 0usize..24,
            recency in proptest::bool::ANY,
            bf16 in proptest::bool::ANY,
            cap in 1usize..5,
            layout in proptest::collection::vec((0i64..7, proptest::bool::weighted(0.8)), 96),
        ) {
            let queries = keys - queries_cut % keys;
            let cfg = ModelConfig {
                arch: Arch::Transformer,
                num_items: 10,
                num_event_types: 1,
                max_len: 24,
                d_model: 8,
                n_heads: 2,
                n_layers: 1,
                ffn_dim: 8,
                dropout: 0.0,
                tied_output: true,
                features: Features { session_recency: recency, session_cap: cap, ..Features::default() },
                session_gap_secs: 60,
            };
            tch::manual_seed(seed);
            let mut vs = nn::VarStore::new(Device::Cpu);
            let mut transformer = Transformer::new(&vs.root(), &cfg, &Arc::new(MaskSource::default()));
            if let Some(table) = &mut transformer.session_bias {
                let random = Tensor::randn(table.ws.size(), (Kind::Float, Device::Cpu));
                tch::no_grad(|| table.ws.copy_(&random));
            }
            if bf16 {
                vs.bfloat16();
            }
            let (sessions, allowed): (Vec<i64>, Vec<bool>) = layout.iter().cycle().take(rows * keys).copied().unzip();
            let table = to_host_f32(&transformer.bias_table());
            let heads = transformer.bias_table().size()[1] as usize;
            let blocked = table.len() / heads - 1;
            let mut expected = Vec::new();
            for row in 0..rows {
                let (sessions, allowed) = (&sessions[row * keys..][..keys], &allowed[row * keys..][..keys]);
                for head in 0..heads {
                    for query in keys - queries..keys {
                        for key in 0..keys {
                            let table_row = match key == query || (key < query && allowed[key]) {
                                true if recency => (sessions[query] - sessions[key]).clamp(0, cap as i64) as usize,
                                true => 0,
                                false => blocked,
                            };
                            expected.push(table[table_row * heads + head]);
                        }
                    }
                }
            }
            for differentiable in [false, true] {
                let bias = tch::no_grad(|| transformer.attention_bias(&sessions, &allowed, keys, queries, differentiable));
                proptest::prop_assert_eq!(bias.size(), vec![rows as i64, heads as i64, queries as i64, keys as i64]);
                proptest::prop_assert_eq!(bias.kind(), transformer.bias_table().kind());
                proptest::prop_assert_eq!(&to_host_f32(&bias), &expected, "differentiable: {}", differentiable);
            }
        }

        /// The host's chunked attention is attention: against softmax(q·kᵀ/√d + bias)·v in f64
        /// for random shapes around and past the chunk size, a cached prefix (more keys than
        /// queries) and a bias that blocks later keys, unreadable keys and some earlier ones.
        #[test]
        fn chunked_attention_equals_attention_computed_in_f64(
            seed in 0i64..1_000_000,
            rows in 1i64..3,
            queries in 1i64..(3 * QUERY_CHUNK),
            prefix in 0i64..40,
        ) {
            tch::manual_seed(seed);
            let (heads, head_dim, keys) = (2, 8, prefix + queries);
            let options = (Kind::Float, Device::Cpu);
            let q = Tensor::randn([rows, heads, queries, head_dim], options);
            let k = Tensor::randn([rows, heads, keys, head_dim], options);
            let v = Tensor::randn([rows, heads, keys, head_dim], options);
            // Query i is key prefix + i: it may read itself, and earlier keys unless drawn blocked.
            let query_at = Tensor::arange(queries, (Kind::Int64, Device::Cpu)).view([queries, 1]) + prefix;
            let key_at = Tensor::arange(keys, (Kind::Int64, Device::Cpu)).view([1, keys]);
            let unreadable = Tensor::rand([rows, 1, queries, keys], options).lt(0.2).logical_and(&key_at.ne_tensor(&query_at));
            let blocked = key_at.gt_tensor(&query_at).logical_or(&unreadable);
            let bias = Tensor::randn([rows, heads, queries, keys], options)
                .masked_fill(&blocked, f64::NEG_INFINITY);
            let got = causal_attention(&q, &k, &v, &bias);
            let d = |t: &Tensor| t.to_kind(Kind::Double);
            let logits = d(&q).matmul(&d(&k).transpose(-2, -1)) / (head_dim as f64).sqrt() + d(&bias);
            let expected = logits.softmax(-1, Kind::Double).matmul(&d(&v));
            let diff = (d(&got) - expected).abs().max().double_value(&[]);
            proptest::prop_assert!(diff < 1e-5, "max diff {}", diff);
        }
    }

    /// The host's inputs are libtorch's, to the bit: rows of different lengths (left padding),
    /// each row's own number of new positions, every per-event feature drawn on or off, random
    /// tables and random feature buckets.
    #[test]
    fn host_inputs_equal_libtorchs_for_each_rows_new_positions() {
        use crate::model::{encode, HistoryView};
        for seed in 0..24u64 {
            let mut rng = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
            let mut draw = |n: u64| {
                rng ^= rng << 13;
                rng ^= rng >> 7;
                rng ^= rng << 17;
                rng % n
            };
            let cfg = ModelConfig {
                arch: Arch::Transformer,
                num_items: 40,
                num_event_types: 3,
                max_len: 12,
                d_model: 8,
                n_heads: 2,
                n_layers: 1,
                ffn_dim: 16,
                dropout: 0.0,
                tied_output: true,
                features: Features {
                    time_gap: draw(2) == 1,
                    event_type: draw(2) == 1,
                    prediction_gap: draw(2) == 1,
                    calendar: false,
                    session_summary: false,
                    positions: PositionOrigin::WindowStart,
                    ..Features::default()
                },
                session_gap_secs: 60,
            };
            tch::manual_seed(seed as i64);
            let vs = nn::VarStore::new(Device::Cpu);
            let input = InputEmbedding::new(&vs.root(), &cfg, &Arc::new(MaskSource::default()));
            let rows: Vec<_> = (0..4)
                .map(|_| {
                    let len = 1 + draw(12) as usize;
                    let items: Vec<u32> = (0..len).map(|_| 1 + draw(39) as u32).collect();
                    let mut t = 1_000_000i64;
                    let times: Vec<i64> = (0..len)
                        .map(|_| {
                            t += draw(400) as i64;
                            t
                        })
                        .collect();
                    let types: Vec<u32> = (0..len).map(|_| draw(3) as u32).collect();
                    encode(HistoryView::new(&items, &times, &types), t + draw(400) as i64, 12, 60)
                })
                .collect();
            let batch = Batch::trimmed(&rows, Device::Cpu);
            let fresh: Vec<usize> = batch
                .lengths
                .iter()
                .map(|&len| 1 + draw(len.min(4) as u64) as usize)
                .collect();
            let m = *fresh.iter().max().unwrap();
            let reference = to_host_f32(&tch::no_grad(|| input.forward_last(&batch, m as i64, false)));
            let expected: Vec<f32> = reference
                .chunks(m * 8)
                .zip(&fresh)
                .flat_map(|(row, &fresh)| row[(m - fresh) * 8..].to_vec())
                .collect();
            assert_eq!(input.host_last(&batch, &fresh), Some(expected), "seed {seed}");
        }
    }

    /// The repeat term, written out: each distinct item of a row's window (never padding) gets
    /// the row's offset once, at inference and in the training logits; random models (both
    /// encoders), windows with repeats, random gates.
    #[test]
    fn the_repeat_term_raises_each_held_item_once_by_the_offset_its_state_reads() {
        use rand::{Rng, SeedableRng};
        for seed in 0..12u64 {
            let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
            let cfg = ModelConfig {
                arch: [Arch::Transformer, Arch::Lstm][seed as usize % 2],
                num_items: 30,
                num_event_types: 2,
                max_len: 10,
                d_model: 8,
                n_heads: 2,
                n_layers: 1,
                ffn_dim: 16,
                dropout: 0.0,
                tied_output: seed % 3 != 0,
                features: crate::model::Features {
                    repeat_term: true,
                    ..Default::default()
                },
                session_gap_secs: 60,
            };
            tch::manual_seed(seed as i64);
            let vs = nn::VarStore::new(Device::Cpu);
            let net = Network::new(&vs.root(), &cfg);
            let gate = net.repeat.as_ref().expect("a repeat term");
            tch::no_grad(|| {
                gate.ws
                    .shallow_clone()
                    .copy_(&Tensor::randn([1, 8], (Kind::Float, Device::Cpu)));
                let _ = gate
                    .bs
                    .as_ref()
                    .unwrap()
                    .shallow_clone()
                    .fill_(rng.gen_range(-2.0..2.0));
            });
            let rows: Vec<_> = (0..5)
                .map(|_| {
                    let len = rng.gen_range(1..=14);
                    // Few items, so windows repeat some.
                    let items: Vec<u32> = (0..len).map(|_| rng.gen_range(1..8)).collect();
                    let times: Vec<i64> = (0..len as i64).map(|t| 1_000 + 30 * t).collect();
                    crate::model::encode(
                        crate::model::HistoryView::new(&items, &times, &vec![1; len]),
                        2_000,
                        10,
                        60,
                    )
                })
                .collect();
            let batch = Batch::trimmed(&rows, Device::Cpu);
            let hidden = tch::no_grad(|| net.last_hidden(&batch));
            let plain: Vec<Vec<f32>> = Vec::try_from(net.score(&hidden)).unwrap();
            let offsets: Vec<f32> = Vec::try_from(net.repeat_offsets(&hidden).unwrap()).unwrap();
            let served: Vec<Vec<f32>> = Vec::try_from(tch::no_grad(|| net.score_next(&hidden, &batch.items))).unwrap();
            let (mut cell_rows, mut cell_columns) = (Vec::new(), Vec::new());
            for (row, encoded) in rows.iter().enumerate() {
                let mut expected = plain[row].clone();
                let held: std::collections::BTreeSet<i64> = encoded.items.iter().copied().filter(|&i| i != 0).collect();
                for &item in &held {
                    expected[item as usize] += offsets[row];
                    cell_rows.push(row as i64);
                    cell_columns.push(item);
                }
                for (got, want) in served[row].iter().zip(&expected) {
                    assert!((got - want).abs() < 1e-5, "seed {seed}, row {row}: {got} vs {want}");
                }
                let training: Vec<Vec<f32>> = Vec::try_from(tch::no_grad(|| {
                    net.score_with_repeats(&hidden, &cell_rows, &cell_columns)
                }))
                .unwrap();
                assert_eq!(training[row], served[row], "seed {seed}, row {row}");
            }
        }
    }

    #[test]
    fn the_calendar_splits_the_hour_of_the_week_into_hour_of_day_and_weekday() {
        // Padding, Monday 00:00, Monday 23:00, Tuesday 00:00, Sunday 23:00.
        let (hour, day) = hour_and_day(&Tensor::from_slice(&[0i64, 1, 24, 25, 168]));
        assert_eq!(Vec::<i64>::try_from(hour).unwrap(), [0, 1, 24, 1, 24]);
        assert_eq!(Vec::<i64>::try_from(day).unwrap(), [0, 1, 1, 2, 7]);
    }
}
