//! How much arithmetic and memory traffic one batch needs at least: with the measured ceilings
//! this gives the floor a batch's time is judged against.
use serde::Serialize;

use crate::model::{Arch, ModelConfig};

#[derive(Debug, Clone, Copy, Serialize)]
pub struct BatchCost {
    pub flops: f64,
    pub bytes: f64,
}

impl BatchCost {
    /// Time no implementation can beat on a device with these rates: the larger of compute time
    /// and memory time (they overlap at best).
    pub fn floor_seconds(&self, matmul_flops: f64, bytes_per_sec: f64) -> f64 {
        (self.flops / matmul_flops).max(self.bytes / bytes_per_sec)
    }
}

/// Forward over `batch` rows of `seq_len` events, scores for every item at the newest position,
/// and the top-k pass over those scores, with `element_bytes` per activation/weight.
///
/// Counted: the matmuls (projections, attention, FFN, LSTM gates, scoring); every weight read
/// once; each layer's input, QKV, attention output, FFN hidden and output written and read once;
/// the `[B, V]` scores written once and read once by top-k. Softmax, norms and the index batch
/// are left out, so the floor is a lower bound.
pub fn batch_cost(config: &ModelConfig, batch: usize, seq_len: usize, element_bytes: f64) -> BatchCost {
    let (b, l) = (batch as f64, seq_len as f64);
    let (d, f, v, layers) = (
        config.d_model as f64,
        config.ffn_dim as f64,
        config.num_items as f64,
        config.n_layers as f64,
    );
    let tokens = b * l;
    let (layer_flops_per_token, layer_weights, layer_activations_per_token) = match config.arch {
        // QKV + output projection, QKᵀ and AV over all l keys, two FFN matmuls.
        Arch::Transformer => (
            8.0 * d * d + 4.0 * l * d + 4.0 * d * f,
            4.0 * d * d + 2.0 * d * f,
            10.0 * d + 2.0 * f,
        ),
        // Four gates from the input and from the hidden state.
        Arch::Lstm => (16.0 * d * d, 8.0 * d * d, 10.0 * d),
    };
    let flops = tokens * layers * layer_flops_per_token + 2.0 * b * d * v;
    let weights = v * d + layers * layer_weights;
    let activations = tokens * (d + layers * layer_activations_per_token);
    let scores = 2.0 * b * v;
    BatchCost {
        flops,
        bytes: (weights + activations + scores) * element_bytes,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Features;

    #[test]
    fn counts_by_hand_for_a_tiny_transformer() {
        let config = ModelConfig {
            arch: Arch::Transformer,
            num_items: 10,
            num_event_types: 2,
            max_len: 4,
            d_model: 2,
            n_heads: 1,
            n_layers: 1,
            ffn_dim: 8,
            dropout: 0.0,
            tied_output: true,
            features: Features::default(),
            session_gap_secs: 1800,
        };
        let cost = batch_cost(&config, 3, 4, 4.0);
        // Per token: 8·4 + 4·4·2 + 4·2·8 = 128; 12 tokens → 1536; scoring 2·3·2·10 = 120.
        assert_eq!(cost.flops, 1536.0 + 120.0);
        // Weights 10·2 + (4·4 + 2·2·8) = 68; activations 12·(2 + 20 + 16) = 456; scores 60.
        assert_eq!(cost.bytes, (68.0 + 456.0 + 60.0) * 4.0);
        assert_eq!(cost.floor_seconds(1656.0, 1.0), 2336.0);
    }
}
