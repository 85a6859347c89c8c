//! The sequence models, their configuration, input encoding and the on-disk artifact.
pub mod artifact;
pub mod builtin;
pub mod config;
pub mod dropout;
mod host;
pub mod input;
pub mod net;
pub mod prefix;

use tch::{nn, Device, Kind, Tensor};

pub use artifact::{Artifact, ArtifactError};
pub use config::{Arch, Combine, Features, ModelConfig, PositionOrigin};
pub use input::{
    encode, encode_window, events_to_keep, fresh_window_start, Batch, EncodedSeq, HistoryView, WindowPolicy,
};
pub use net::SHORT_APPEND;
pub use prefix::{PrefixPool, Slot};

/// Anything that ranks items for a batch of histories: the trained networks and the baselines
/// are evaluated through this one interface.
pub trait Scorer {
    /// `[B, V]` scores for the next item after each row's last event; higher is better.
    /// `held[row]`: the items of the row's whole history before the prediction (the window shows
    /// only its newest events), which a model with a repeat term raises.
    fn score_next(&self, batch: &Batch, held: &[&[u32]]) -> Tensor;
}

/// Positions (rows × columns) of one inference pass on the host. A pass's activations then stay
/// in a core's L2 cache instead of being fresh pages of main memory: 200-event histories took
/// 2.3–3.3 ms per user in passes of 4 rows and 5.0–5.6 ms in passes of 64 (`xsrec bench forward`).
const HOST_PASS_POSITIONS: usize = 1024;

/// Arithmetic of inference. bf16 halves the bytes every layer and the item table move, which is
/// what bounds large-catalogue scoring on a GPU; ranks can then differ among near-ties.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    #[default]
    Fp32,
    Bf16,
}

impl Precision {
    pub fn kind(self) -> Kind {
        match self {
            Self::Fp32 => Kind::Float,
            Self::Bf16 => Kind::BFloat16,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DeviceError {
    #[error("unknown device `{0}`: use auto, cpu, cuda or cuda:N")]
    Unknown(String),
    #[error("device `{0}` requested but no CUDA device is usable (is libtorch_cuda linked?)")]
    NoCuda(String),
}

/// `auto` picks the first CUDA device when one is usable, else the CPU.
pub fn parse_device(name: &str) -> Result<Device, DeviceError> {
    let device = match name {
        "auto" => Device::cuda_if_available(),
        "cpu" => Device::Cpu,
        "cuda" => Device::Cuda(0),
        other => match other.strip_prefix("cuda:").and_then(|n| n.parse().ok()) {
            Some(n) => Device::Cuda(n),
            None => return Err(DeviceError::Unknown(other.to_owned())),
        },
    };
    if device.is_cuda() && !tch::Cuda::is_available() {
        return Err(DeviceError::NoCuda(name.to_owned()));
    }
    Ok(device)
}

/// A trained (or freshly initialised) network with its parameters.
pub struct SeqModel {
    pub config: ModelConfig,
    pub vs: nn::VarStore,
    pub net: net::Network,
}

impl SeqModel {
    /// Parameters initialised from the global tch seed.
    pub fn new(config: ModelConfig, device: Device) -> Self {
        let vs = nn::VarStore::new(device);
        let net = net::Network::new(&vs.root(), &config);
        Self { config, vs, net }
    }

    pub fn device(&self) -> Device {
        self.vs.device()
    }

    /// Casts every parameter; artifacts stay fp32 on disk whatever runs.
    pub fn set_precision(&mut self, precision: Precision) {
        match precision {
            Precision::Fp32 => self.vs.float(),
            Precision::Bf16 => self.vs.bfloat16(),
        }
    }

    /// `[B, d]` hidden state at the newest event of each row (inference mode). On the host a
    /// large batch runs as passes of about [`HOST_PASS_POSITIONS`] positions each.
    pub fn last_hidden(&self, batch: &Batch) -> Tensor {
        self.in_passes(batch, |part| self.net.last_hidden(part))
    }

    /// [`Self::last_hidden`] before the clock readout ([`net::Network::last_state`]): what the
    /// inference cache keeps.
    pub fn last_state(&self, batch: &Batch) -> Tensor {
        self.in_passes(batch, |part| self.net.last_state(part))
    }

    /// `states` from [`Self::last_state`] of `batch`'s rows (or a cache) with the clock readout
    /// of `batch`'s moments added: [`Self::last_hidden`].
    pub fn read_clock(&self, states: Tensor, batch: &Batch) -> Tensor {
        tch::no_grad(|| self.net.read_clock(states, batch))
    }

    /// `pass` over `batch` in inference mode, on the host in parts of about
    /// [`HOST_PASS_POSITIONS`] positions (row-wise results, concatenated).
    fn in_passes(&self, batch: &Batch, pass: impl Fn(&Batch) -> Tensor) -> Tensor {
        let rows = batch.size() as usize;
        let per_pass = (HOST_PASS_POSITIONS / batch.seq_len().max(1) as usize).max(1);
        if batch.device() != Device::Cpu || rows <= per_pass {
            return tch::no_grad(|| pass(batch));
        }
        let parts: Vec<Tensor> = (0..rows)
            .step_by(per_pass)
            .map(|start| tch::no_grad(|| pass(&batch.rows(start, per_pass.min(rows - start)))))
            .collect();
        Tensor::cat(&parts, 0)
    }

    /// [`Self::last_state`] computing only the positions after each row's prefix in `pool`,
    /// and growing the prefixes ([`net::Network::extend`]); `None` where appending is not exact.
    pub fn extend_last_state(&self, batch: &Batch, pool: &mut PrefixPool, slots: &[&Slot]) -> Option<Tensor> {
        tch::no_grad(|| self.net.extend(batch, pool, slots))
    }
}

impl SeqModel {
    /// Attention of the newest position over every position, per layer, averaged over heads
    /// (`[layers][L]`, row 0 of the batch). Empty for the LSTM.
    pub fn last_position_attention(&self, batch: &Batch) -> Vec<Vec<f32>> {
        let mut weights = Vec::new();
        let _hidden = tch::no_grad(|| self.net.hidden_with_attention(batch, false, Some(&mut weights)));
        weights
            .iter()
            .map(|w| {
                Vec::<f32>::try_from(
                    w.get(0)
                        .mean_dim(0, false, Kind::Float)
                        .select(0, -1)
                        .to_device(Device::Cpu),
                )
                .expect("weights")
            })
            .collect()
    }
}

impl Scorer for SeqModel {
    fn score_next(&self, batch: &Batch, held: &[&[u32]]) -> Tensor {
        let hidden = self.last_hidden(batch);
        if !self.config.features.repeat_term {
            return tch::no_grad(|| self.net.score(&hidden));
        }
        let held: Vec<Vec<i64>> = held.iter().map(|items| item_indices(items)).collect();
        let held = Tensor::cat(&[&batch.items, &padded_index(&held, batch.device())], 1);
        tch::no_grad(|| self.net.score_next(&hidden, &held))
    }
}

/// Ranks by training popularity, whatever the history.
pub struct Popularity {
    counts: Tensor,
}

impl Popularity {
    pub fn new(counts: &[u64], device: Device) -> Self {
        let counts: Vec<f32> = counts.iter().map(|&c| c as f32).collect();
        Self {
            counts: Tensor::from_slice(&counts).to_device(device),
        }
    }
}

impl Scorer for Popularity {
    fn score_next(&self, batch: &Batch, _held: &[&[u32]]) -> Tensor {
        // A tensor of its own (for a batch of one, `expand(..).contiguous()` would be a view of
        // `counts`): callers mask scores in place.
        self.counts.unsqueeze(0).repeat([batch.size(), 1])
    }
}

/// Sets `scores[row, item] = -inf` for each row's listed items and for the padding item (never
/// a recommendation), in place: a `[B, V]` copy is the largest memory pass of ranking a big
/// catalogue, so `scores` must be a tensor nothing else still reads unmasked.
pub fn mask_items<R: AsRef<[i64]>>(mut scores: Tensor, items: &[R]) -> Tensor {
    let index = padded_index(items, scores.device());
    let _ = scores.scatter_value_(1, &index, f64::NEG_INFINITY);
    let _ = scores.narrow(1, 0, 1).fill_(f64::NEG_INFINITY);
    scores
}

/// Item indices as the index tensors take them.
pub fn item_indices(items: &[u32]) -> Vec<i64> {
    items.iter().map(|&i| i64::from(i)).collect()
}

/// `[B, W]` int64 tensor of ragged rows padded with 0 (the padding item) to the longest row.
pub fn padded_index<R: AsRef<[i64]>>(rows: &[R], device: Device) -> Tensor {
    let width = rows.iter().map(|r| r.as_ref().len()).max().unwrap_or(1).max(1);
    let padded: Vec<i64> = rows
        .iter()
        .flat_map(|row| row.as_ref().iter().copied().chain(std::iter::repeat(0)).take(width))
        .collect();
    input::to_device_pinned(
        Tensor::from_slice(&padded).view([rows.len() as i64, width as i64]),
        device,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn masking_removes_listed_items_and_the_padding_item_and_nothing_else() {
        let scores = Tensor::from_slice(&[9f32, 1., 2., 3., 9., 1., 2., 3.]).view([2, 4]);
        let masked = mask_items(scores, &[vec![2i64], vec![]]);
        let rows: Vec<Vec<f32>> = Vec::try_from(masked).unwrap();
        let inf = f32::NEG_INFINITY;
        assert_eq!(rows, [vec![inf, 1., inf, 3.], vec![inf, 1., 2., 3.]]);
    }

    #[test]
    fn masking_popularity_scores_leaves_the_counts_alone_even_for_one_row() {
        let popularity = Popularity::new(&[0, 5, 7, 9], Device::Cpu);
        let row = encode(HistoryView::new(&[1], &[10], &[1]), 20, 4, 1800);
        let batch = Batch::new(&[row], Device::Cpu);
        let _ = mask_items(popularity.score_next(&batch, &[&[1]]), &[vec![2i64]]);
        let again: Vec<Vec<f32>> = Vec::try_from(popularity.score_next(&batch, &[&[1]])).unwrap();
        assert_eq!(again, [vec![0., 5., 7., 9.]]);
    }
}
