//! What incremental inference keeps of a user's window: the keys and values of its first
//! positions, which later positions attend to and which an appended event does not change
//! (positions counted from the window start; `Network::extend`).
use tch::{Device, Kind, Tensor};

/// The keys and values of a window's first P positions in every layer, with their session
/// indices. A prefix of a batch has its rows left-padded to the longest; `real` says which slots
/// hold a position. All layers live in one tensor, so that batching and growing a prefix cost a
/// few tensor operations per row, not a few per row and layer.
#[derive(Debug)]
pub struct Prefix {
    /// `[2 × layers, B, H, P, head_dim]`: layer `l`'s keys at `2l`, its values at `2l + 1`.
    states: Tensor,
    /// `[B, P]`: session index of each position within its window.
    pub(super) sessions: Tensor,
    /// `[B, P]` bool.
    pub(super) real: Tensor,
}

impl Prefix {
    pub(super) fn empty(layers: usize, heads: i64, head_dim: i64, kind: Kind, device: Device) -> Self {
        Self {
            states: Tensor::zeros([2 * layers as i64, 1, heads, 0, head_dim], (kind, device)),
            sessions: Tensor::zeros([1, 0], (Kind::Int64, device)),
            real: Tensor::zeros([1, 0], (Kind::Bool, device)),
        }
    }

    /// Positions held (by each row of a one-row prefix, the longest row otherwise).
    pub fn len(&self) -> usize {
        self.sessions.size()[1] as usize
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Bytes of keys and values held: layers × positions × d × 2 × the element size.
    pub fn bytes(&self) -> usize {
        self.states.numel() * self.states.kind().elt_size_in_bytes()
    }

    /// Layer `layer`'s keys and values, `[B, H, P, head_dim]` each.
    pub(super) fn layer(&self, layer: usize) -> (Tensor, Tensor) {
        (self.states.get(2 * layer as i64), self.states.get(2 * layer as i64 + 1))
    }

    /// One-row prefixes as the rows of one, left-padded to the longest.
    pub(super) fn stack(rows: &[&Prefix]) -> Self {
        if let [only] = rows {
            return only.shallow_clone();
        }
        let longest = rows.iter().map(|row| row.len()).max().unwrap_or(0) as i64;
        let pads: Vec<i64> = rows.iter().map(|row| longest - row.len() as i64).collect();
        let states: Vec<Tensor> = rows
            .iter()
            .zip(&pads)
            .map(|(row, &pad)| row.states.constant_pad_nd([0, 0, pad, 0]))
            .collect();
        let sessions: Vec<Tensor> = rows
            .iter()
            .zip(&pads)
            .map(|(row, &pad)| row.sessions.constant_pad_nd([pad, 0]))
            .collect();
        let device = rows.first().map_or(Device::Cpu, |row| row.sessions.device());
        let first_real = Tensor::from_slice(&pads).to_device(device);
        Self {
            states: Tensor::cat(&states, 1),
            sessions: Tensor::cat(&sessions, 0),
            real: Tensor::arange(longest, (Kind::Int64, device))
                .unsqueeze(0)
                .ge_tensor(&first_real.unsqueeze(1)),
        }
    }

    /// The same tensors, shared (prefixes are never written in place).
    pub fn shallow_clone(&self) -> Self {
        Self {
            states: self.states.shallow_clone(),
            sessions: self.sessions.shallow_clone(),
            real: self.real.shallow_clone(),
        }
    }

    /// This one-row prefix followed by `count` positions of row `row` of a batch's new keys and
    /// values (`[2 × layers, B, H, m, head_dim]`, as [`Self::states`] holds them) and sessions
    /// (`[B, m]`), from column `start`. The result owns its memory, so it keeps no batch tensor
    /// alive.
    pub(super) fn append(&self, states: &Tensor, sessions: &Tensor, row: i64, start: i64, count: i64) -> Self {
        let states = Tensor::cat(&[&self.states, &states.narrow(1, row, 1).narrow(3, start, count)], 3);
        let sessions = Tensor::cat(
            &[&self.sessions, &sessions.narrow(0, row, 1).narrow(1, start, count)],
            1,
        );
        Self {
            states,
            real: sessions.ones_like().to_kind(Kind::Bool),
            sessions,
        }
    }
}
