//! What incremental inference keeps of its users' windows: the keys and values of their first
//! positions, which later positions attend to and which an appended event does not change
//! (positions counted from the window start; `Network::extend`).
use tch::{Device, Kind, Tensor};

use super::host::{HostRow, HostTransformer};

/// The keys and values of many users' window prefixes, one fixed-size slot each, in one tensor:
/// a batch gathers its rows' prefixes with one indexed read and stores its new positions with
/// one indexed write, whatever the mix of prefix lengths. A slot holds up to `max_len`
/// positions.
#[derive(Debug)]
pub struct PrefixPool {
    /// `[slots, max_len, 2 × layers, H, head_dim]`: layer `l`'s keys at `2l`, values at `2l + 1`.
    states: Tensor,
    /// Per allocated slot, the session index (within its window) of each position it holds:
    /// its length is the slot's. On the host, where the attention index is built.
    sessions: Vec<Vec<i64>>,
    free: Vec<usize>,
    max_len: i64,
    /// The model's weights on the host, where appends run there (CPU, fp32 storage).
    host: Option<HostTransformer>,
}

/// A pool slot, owned by whoever holds it (it is not `Clone`): it returns to the pool only
/// through [`PrefixPool::release`] or [`PrefixPool::clear`].
#[derive(Debug, PartialEq, Eq)]
pub struct Slot(usize);

impl PrefixPool {
    /// A pool of as many slots of `max_len` positions as fit in `budget` bytes, stored as `kind`
    /// (bf16 halves the memory; computation stays in the model's precision).
    pub(super) fn new(budget: usize, max_len: usize, per_position: [i64; 3], kind: Kind, device: Device) -> Self {
        let [states, heads, head_dim] = per_position;
        let max_len = max_len as i64;
        let slot_bytes = (max_len * states * heads * head_dim) as usize * kind.elt_size_in_bytes();
        let slots = (budget / slot_bytes.max(1)) as i64;
        // Uninitialised (each slot is zeroed when first handed out), so on CPU the pages are
        // mapped only as slots come into use, and memory follows use without a pause to copy
        // a grown pool.
        Self {
            states: Tensor::empty([slots, max_len, states, heads, head_dim], (kind, device)),
            sessions: Vec::new(),
            free: Vec::new(),
            max_len,
            host: None,
        }
    }

    /// Extensions of this pool run on the host with `host` where the pool is in host memory
    /// and fp32 (else through libtorch).
    pub(super) fn with_host_kernel(mut self, host: HostTransformer) -> Self {
        let fits = self.states.device() == Device::Cpu
            && self.states.kind() == Kind::Float
            && self.states.size()[2..].iter().product::<i64>() as usize == host.per_position();
        self.host = fits.then_some(host);
        self
    }

    /// Extensions through libtorch's operations even on the host (the reference path, for
    /// tests and benchmarks).
    pub fn without_host_kernel(mut self) -> Self {
        self.host = None;
        self
    }

    /// Whether extensions run on the host (see [`super::host`]).
    pub fn on_host(&self) -> bool {
        self.host.is_some()
    }

    /// Runs `rows` (one per slot of `slots`) after their slots' positions on the host, keeps
    /// each row's new positions but the newest in its slot, and returns
    /// the rows' newest hidden states (`[B, d]`); `None` where the pool has no host kernel.
    pub(super) fn extend_on_host(
        &mut self,
        slots: &[&Slot],
        inputs: &[&[f32]],
        new_sessions: &[&[i64]],
    ) -> Option<Vec<f32>> {
        let host = self.host.as_ref()?;
        let slot_values = (self.max_len as usize) * host.per_position();
        for (slot, new) in slots.iter().zip(new_sessions) {
            assert!(
                self.sessions[slot.0].len() + new.len() <= self.max_len as usize,
                "a slot holds at most max_len positions"
            );
        }
        let rows: Vec<HostRow> = slots
            .iter()
            .zip(inputs)
            .zip(new_sessions)
            .map(|((slot, inputs), new)| HostRow {
                slot_offset: slot.0 * slot_values,
                held_sessions: &self.sessions[slot.0],
                new_sessions: new,
                inputs,
            })
            .collect();
        let values = self.states.numel();
        assert!(self.states.is_contiguous(), "a pool is one contiguous tensor");
        // SAFETY: the pool's tensor is a contiguous fp32 CPU tensor (checked when the kernel
        // was attached) of `values` elements that nothing else reads or writes while the pool
        // is borrowed mutably here.
        let states = unsafe { std::slice::from_raw_parts_mut(self.states.data_ptr() as *mut f32, values) };
        let newest = host.extend(&rows, states);
        for (slot, new) in slots.iter().zip(new_sessions) {
            self.sessions[slot.0].extend_from_slice(&new[..new.len() - 1]);
        }
        Some(newest)
    }

    /// Bytes of one slot: layers × max_len × d × 2 (keys and values) × the element size.
    pub fn slot_bytes(&self) -> usize {
        let [_, max_len, states, heads, head_dim] = self.states.size()[..] else {
            unreachable!("five dimensions")
        };
        (max_len * states * heads * head_dim) as usize * self.states.kind().elt_size_in_bytes()
    }

    /// Slots the pool may hold.
    pub fn capacity(&self) -> usize {
        self.states.size()[0] as usize
    }

    /// Slots handed out and not yet released.
    pub fn in_use(&self) -> usize {
        self.sessions.len() - self.free.len()
    }

    /// Bytes of the slots in use.
    pub fn bytes_in_use(&self) -> usize {
        self.in_use() * self.slot_bytes()
    }

    /// An empty slot, or `None` when all `capacity` are in use.
    pub fn allocate(&mut self) -> Option<Slot> {
        let index = match self.free.pop() {
            Some(index) => index,
            None if self.sessions.len() < self.capacity() => {
                // Zeroed on first use: a batch reads every slot's positions up to its longest
                // row and masks the rest, and masked garbage (a NaN) would still poison the
                // weighted sum of values.
                let _ = self.states.get(self.sessions.len() as i64).zero_();
                self.sessions.push(Vec::with_capacity(self.max_len as usize));
                self.sessions.len() - 1
            }
            None => return None,
        };
        self.sessions[index].clear();
        Some(Slot(index))
    }

    pub fn release(&mut self, slot: Slot) {
        self.free.push(slot.0);
    }

    /// Every slot free again (what holders there are must forget theirs).
    pub fn clear(&mut self) {
        self.free = (0..self.sessions.len()).collect();
    }

    /// Positions `slot` holds.
    pub fn len(&self, slot: &Slot) -> usize {
        self.sessions[slot.0].len()
    }

    /// Session index of each position `slot` holds.
    pub(super) fn sessions(&self, slot: &Slot) -> &[i64] {
        &self.sessions[slot.0]
    }

    /// Keeps only the first `len` positions of `slot` (0: the next extension starts its window
    /// afresh).
    pub fn truncate(&mut self, slot: &Slot, len: usize) {
        self.sessions[slot.0].truncate(len);
    }

    /// `[B, P + room, 2 × layers, H, head_dim]` in `kind`, P the longest prefix of `slots`:
    /// each row's prefix in its first positions (right-padded with what the slot holds beyond
    /// it, which attention must mask), and `room` positions left for the batch's new ones, so
    /// that every layer writes its new keys and values beside the prefix's instead of copying
    /// both into a new tensor.
    pub(super) fn gather(&self, slots: &[&Slot], room: i64, kind: Kind) -> Tensor {
        let device = self.states.device();
        let longest = slots.iter().map(|slot| self.len(slot)).max().unwrap_or(0) as i64;
        let index = Tensor::from_slice(&slots.iter().map(|slot| slot.0 as i64).collect::<Vec<_>>()).to_device(device);
        let mut shape = self.states.size();
        shape[0] = slots.len() as i64;
        shape[1] = longest + room;
        let gathered = Tensor::empty(shape.as_slice(), (kind, device));
        let held = self.states.narrow(1, 0, longest);
        let mut prefix = gathered.narrow(1, 0, longest);
        if kind == self.states.kind() {
            let _ = held.index_select_out(&prefix, 0, &index);
        } else {
            prefix.copy_(&held.index_select(0, &index));
        }
        gathered
    }

    /// Appends to each slot `sessions[row].len()` positions of `states` (`[B, P, 2 × layers, H,
    /// head_dim]`, contiguous), from position `starts[row]` of its row, with those sessions.
    pub(super) fn append(&mut self, slots: &[&Slot], states: &Tensor, starts: &[i64], sessions: &[&[i64]]) {
        let width = states.size()[1];
        let (mut from, mut to) = (Vec::new(), Vec::new());
        for (row, ((slot, &start), new)) in slots.iter().zip(starts).zip(sessions).enumerate() {
            let held = &mut self.sessions[slot.0];
            assert!(
                (held.len() + new.len()) as i64 <= self.max_len,
                "a slot holds at most max_len positions"
            );
            for offset in 0..new.len() as i64 {
                from.push(row as i64 * width + start + offset);
                to.push(slot.0 as i64 * self.max_len + held.len() as i64 + offset);
            }
            held.extend_from_slice(new);
        }
        if from.is_empty() {
            return;
        }
        let device = self.states.device();
        let (from, to) = (
            Tensor::from_slice(&from).to_device(device),
            Tensor::from_slice(&to).to_device(device),
        );
        let per_position: i64 = self.states.size()[2..].iter().product();
        let new_states = states
            .view([-1, per_position])
            .index_select(0, &from)
            .to_kind(self.states.kind());
        let mut pool = self.states.view([-1, per_position]);
        let _ = pool.index_copy_(0, &to, &new_states);
    }
}
