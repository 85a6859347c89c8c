//! Model hyper-parameters and feature switches, saved as part of `config.json`.
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Arch {
    /// SASRec-style causal Transformer with cross-session features.
    Transformer,
    /// GRU-free LSTM baseline over the same input features.
    Lstm,
}

/// How the per-event feature embeddings are merged into one input vector.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Combine {
    Sum,
    /// Concatenate then project back to `d_model` with a linear layer.
    Concat,
}

/// Where the position embeddings count from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum PositionOrigin {
    /// The newest event is always the last position, so an appended event moves every
    /// position and changes every earlier position's keys and values.
    #[default]
    Newest,
    /// The window's oldest event is position 0: an appended event leaves the earlier positions'
    /// keys and values as they were, so serving can keep them and compute only the new
    /// positions (`Network::extend`).
    WindowStart,
}

/// The cross-session structure, each part switchable for ablation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Features {
    /// Per-head attention bias by how many sessions separate query and key (0 = same session).
    pub session_recency: bool,
    /// Embedding of the log-bucketed gap to the previous event.
    pub time_gap: bool,
    /// Embedding of the event type (view, click, …) when the data has types.
    pub event_type: bool,
    /// Embedding of the gap between an event and the moment of prediction.
    pub prediction_gap: bool,
    /// Embedding of the hour of day and day of week (UTC) of the moment each position predicts,
    /// shared by all users. Off by default: it cost ml-100k 0.005 NDCG@10, and the clock
    /// readout carries each user's own habits (docs/QUALITY.md). Absent from artifacts made
    /// before it existed, which therefore read it as off.
    #[serde(default)]
    pub calendar: bool,
    /// Each event also reads the mean item embedding of the session before its own, projected:
    /// "what the user did last time" becomes a key that attention can match against what the
    /// user does now, so a cross-session succession needs one attention step instead of two.
    /// Off by default: it helped on some cross-session logs, hurt on others and on ml-100k
    /// (docs/QUALITY.md). Absent from older artifacts, which therefore read it as off.
    #[serde(default)]
    pub session_summary: bool,
    /// Each position's hidden state also reads what followed earlier sessions that resemble
    /// its own session so far: the items of every earlier session whose predecessor is similar
    /// (cosine of mean item vectors), through a gate the hidden state sets. A user-level
    /// session kNN, "what came next last time I was here", which the encoder alone did not
    /// learn (docs/QUALITY.md, rotation). Absent from older artifacts, which read it as off.
    #[serde(default)]
    pub session_successor: bool,
    /// Each position's hidden state also reads what the user did in earlier sessions at an hour
    /// of day and day of week like the moment it predicts, through a gate the hidden state sets:
    /// one user's own daily or weekly habit, which the calendar embedding (shared by all users)
    /// could not express in a mixture of users (docs/QUALITY.md). Absent from older artifacts,
    /// which read it as off.
    #[serde(default)]
    pub clock_readout: bool,
    /// A score offset, read from the hidden state, added to every item the window holds: how
    /// likely this user is, now, to go back to something they already had. Repeat purchases
    /// make it positive; a catalogue nobody returns to (a film is rated once) makes it strongly
    /// negative, so a ranking that keeps seen items still puts new ones first. Learned only
    /// when seen items stay in the training softmax (`--loss-keep-seen`). Absent from older
    /// artifacts, which read it as off.
    #[serde(default)]
    pub repeat_term: bool,
    pub combine: Combine,
    /// Absent from artifacts made before it existed, which count from the newest event.
    #[serde(default)]
    pub positions: PositionOrigin,
    /// Session distances at or above this share one bias.
    pub session_cap: usize,
}

impl Default for Features {
    fn default() -> Self {
        Self {
            session_recency: true,
            time_gap: true,
            event_type: true,
            prediction_gap: true,
            calendar: false,
            session_summary: false,
            session_successor: true,
            clock_readout: true,
            repeat_term: false,
            combine: Combine::Sum,
            positions: PositionOrigin::Newest,
            session_cap: 8,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelConfig {
    pub arch: Arch,
    /// Item table rows, padding row 0 included.
    pub num_items: usize,
    /// Event-type table rows, padding row 0 included.
    pub num_event_types: usize,
    pub max_len: usize,
    pub d_model: usize,
    pub n_heads: usize,
    pub n_layers: usize,
    pub ffn_dim: usize,
    pub dropout: f64,
    /// Score with the input item embeddings (true) or a separate output table.
    pub tied_output: bool,
    pub features: Features,
    /// Inactivity gap that ends a session; part of the model because its features depend on it.
    pub session_gap_secs: i64,
}

impl ModelConfig {
    pub fn validate(&self) -> Result<(), String> {
        if self.d_model == 0 || self.n_heads == 0 || !self.d_model.is_multiple_of(self.n_heads) {
            return Err(format!(
                "d_model ({}) must be a positive multiple of n_heads ({})",
                self.d_model, self.n_heads
            ));
        }
        if self.max_len == 0 || self.n_layers == 0 || self.ffn_dim == 0 {
            return Err("max_len, n_layers and ffn_dim must be positive".into());
        }
        if self.num_items < 2 {
            return Err(format!(
                "num_items ({}) must include padding and at least one item",
                self.num_items
            ));
        }
        if !(0.0..1.0).contains(&self.dropout) {
            return Err(format!("dropout ({}) must be in [0, 1)", self.dropout));
        }
        Ok(())
    }
}
