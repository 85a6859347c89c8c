//! What incremental inference keeps of a user's window: the keys and values of its first
//! positions, which later positions attend to and which an appended event does not change
//! (positions counted from the window start; `Network::extend`).
use tch::{Device, Kind, Tensor};

/// Per layer, the keys and values of a window's first P positions, with their session indices.
/// A prefix of a batch has its rows left-padded to the longest; `real` says which slots hold a
/// position.
#[derive(Debug)]
pub struct Prefix {
    /// Per layer, `[B, H, P, head_dim]`.
    pub(super) keys: Vec<Tensor>,
    /// Per layer, `[B, H, P, head_dim]`.
    pub(super) values: Vec<Tensor>,
    /// `[B, P]`: session index of each position within its window.
    pub(super) sessions: Tensor,
    /// `[B, P]` bool.
    pub(super) real: Tensor,
}

impl Prefix {
    pub(super) fn empty(layers: usize, heads: i64, head_dim: i64, kind: Kind, device: Device) -> Self {
        let none = || Tensor::zeros([1, heads, 0, head_dim], (kind, device));
        Self {
            keys: (0..layers).map(|_| none()).collect(),
            values: (0..layers).map(|_| none()).collect(),
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
        self.keys
            .iter()
            .chain(&self.values)
            .map(|t| t.numel() * t.kind().elt_size_in_bytes())
            .sum()
    }

    /// One-row prefixes as the rows of one, left-padded to the longest.
    pub(super) fn stack(rows: &[&Prefix]) -> Self {
        if let [only] = rows {
            return only.shallow_clone();
        }
        let longest = rows.iter().map(|row| row.len()).max().unwrap_or(0) as i64;
        let pads: Vec<i64> = rows.iter().map(|row| longest - row.len() as i64).collect();
        let padded = |pick: &dyn Fn(&Prefix) -> &Tensor, dims_after: usize| {
            let parts: Vec<Tensor> = rows
                .iter()
                .zip(&pads)
                .map(|(row, &pad)| {
                    let mut padding = vec![0; 2 * dims_after];
                    padding.extend([pad, 0]);
                    pick(row).constant_pad_nd(padding)
                })
                .collect();
            Tensor::cat(&parts, 0)
        };
        let layers = rows.first().map_or(0, |row| row.keys.len());
        let device = rows.first().map_or(Device::Cpu, |row| row.sessions.device());
        let first_real = Tensor::from_slice(&pads).to_device(device);
        Self {
            keys: (0..layers).map(|layer| padded(&|p| &p.keys[layer], 1)).collect(),
            values: (0..layers).map(|layer| padded(&|p| &p.values[layer], 1)).collect(),
            sessions: padded(&|p| &p.sessions, 0),
            real: Tensor::arange(longest, (Kind::Int64, device))
                .unsqueeze(0)
                .ge_tensor(&first_real.unsqueeze(1)),
        }
    }

    /// The same tensors, shared (prefixes are never written in place).
    pub fn shallow_clone(&self) -> Self {
        let all = |tensors: &[Tensor]| tensors.iter().map(Tensor::shallow_clone).collect();
        Self {
            keys: all(&self.keys),
            values: all(&self.values),
            sessions: self.sessions.shallow_clone(),
            real: self.real.shallow_clone(),
        }
    }

    /// This one-row prefix followed by `count` positions of row `row` of a batch's new keys and
    /// values (per layer `[B, H, m, head_dim]`) and sessions (`[B, m]`), from column `start`.
    /// The result owns its memory, so it keeps no batch tensor alive.
    pub(super) fn append(
        &self,
        keys_values: &[(Tensor, Tensor)],
        sessions: &Tensor,
        row: i64,
        start: i64,
        count: i64,
    ) -> Self {
        let part = |t: &Tensor, dim: i64| t.narrow(0, row, 1).narrow(dim, start, count);
        let joined = |old: &Tensor, new: &Tensor, dim: i64| Tensor::cat(&[old, &part(new, dim)], dim);
        let sessions = joined(&self.sessions, sessions, 1);
        Self {
            keys: self
                .keys
                .iter()
                .zip(keys_values)
                .map(|(old, (k, _))| joined(old, k, 2))
                .collect(),
            values: self
                .values
                .iter()
                .zip(keys_values)
                .map(|(old, (_, v))| joined(old, v, 2))
                .collect(),
            real: sessions.ones_like().to_kind(Kind::Bool),
            sessions,
        }
    }
}
