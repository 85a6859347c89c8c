//! The one function that turns a user's history into model input, used by training, offline
//! evaluation and serving alike.
use std::borrow::Borrow;

use tch::{Device, Kind, Tensor};

use super::Features;
use crate::data::session::{
    gap_bucket, hour_of_week, session_indices, GAP_BUCKET_NONE, GAP_BUCKET_PAD, NUM_HOUR_SLOTS,
};

/// A user's events in the model's index space, oldest first.
#[derive(Debug, Clone, Copy)]
pub struct HistoryView<'a> {
    pub items: &'a [u32],
    pub timestamps: &'a [i64],
    pub types: &'a [u32],
}

impl<'a> HistoryView<'a> {
    pub fn new(items: &'a [u32], timestamps: &'a [i64], types: &'a [u32]) -> Self {
        assert!(items.len() == timestamps.len() && items.len() == types.len());
        Self {
            items,
            timestamps,
            types,
        }
    }

    /// The first `len` events.
    pub fn prefix(&self, len: usize) -> Self {
        Self::new(&self.items[..len], &self.timestamps[..len], &self.types[..len])
    }

    pub fn len(&self) -> usize {
        self.items.len()
    }

    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }
}

/// One left-padded input row of length `max_len` (padding = 0 everywhere).
#[derive(Debug, Clone, PartialEq)]
pub struct EncodedSeq {
    pub items: Vec<i64>,
    pub types: Vec<i64>,
    /// Bucket of the gap to the previous event.
    pub gaps: Vec<i64>,
    /// Bucket of the gap from this event to the moment its output predicts.
    pub prediction_gaps: Vec<i64>,
    /// Session index within the window; only differences between positions carry meaning.
    pub sessions: Vec<i64>,
    /// Hour of the week of the moment this position predicts (see [`hour_of_week`]).
    pub prediction_hours: Vec<i64>,
}

/// What besides the history the state before the clock readout
/// ([`SeqModel::last_state`](super::SeqModel::last_state)) depends on: the bucket of the gap
/// from the newest event to `predict_at`, and the hour of the week of `predict_at` where the
/// calendar input reads it; each 0 when the model does not read it (and both for an empty
/// history). Two moments with the same key give that state the same input, so a state computed
/// for one serves the other: this is the inference cache's staleness rule, kept here so that a
/// new feature depending on the moment must change it too (the test below holds `encode` to
/// it, and tests/model.rs the state). The clock readout, which reads the hour too, is added
/// after the cache, per request: an hour's change keeps every cached state.
pub fn moment_key(history: HistoryView, predict_at: i64, features: &Features, session_gap_secs: i64) -> i64 {
    let Some(&last) = history.timestamps.last() else {
        return 0;
    };
    let gap = match features.prediction_gap {
        true => gap_bucket(predict_at - last, session_gap_secs),
        false => 0,
    };
    let hour = match features.calendar {
        true => hour_of_week(predict_at),
        false => 0,
    };
    gap * NUM_HOUR_SLOTS + hour
}

/// Encodes the newest `max_len` events of `history`. Position `j` predicts what happens at the
/// next event's time, and the last position predicts what happens at `predict_at`.
///
/// Every feature of position `j` depends only on events up to `j` (and, for the prediction gap,
/// on the time of `j + 1`), which keeps the model causal.
pub fn encode(history: HistoryView, predict_at: i64, max_len: usize, session_gap_secs: i64) -> EncodedSeq {
    encode_window(
        history,
        history.len().saturating_sub(max_len),
        predict_at,
        max_len,
        session_gap_secs,
    )
}

/// Like [`encode`], of the events from index `start` on (at most `max_len` of them): the
/// window that incremental inference keeps (see [`fresh_window_start`]). The first event's gap
/// is still the gap to the event before it.
pub fn encode_window(
    history: HistoryView,
    start: usize,
    predict_at: i64,
    max_len: usize,
    session_gap_secs: i64,
) -> EncodedSeq {
    let n = history.len();
    assert!(
        start <= n && n - start <= max_len,
        "a window of {start}..{n} for max_len {max_len}"
    );
    let pad = max_len - (n - start);
    let mut seq = EncodedSeq {
        items: vec![0; max_len],
        types: vec![0; max_len],
        gaps: vec![GAP_BUCKET_PAD; max_len],
        prediction_gaps: vec![GAP_BUCKET_PAD; max_len],
        sessions: vec![0; max_len],
        prediction_hours: vec![0; max_len],
    };
    let window_sessions = session_indices(&history.timestamps[start..], session_gap_secs);
    for (offset, i) in (start..n).enumerate() {
        let j = pad + offset;
        let ts = history.timestamps[i];
        seq.items[j] = i64::from(history.items[i]);
        seq.types[j] = i64::from(history.types[i]);
        seq.gaps[j] = match i {
            0 => GAP_BUCKET_NONE,
            _ => gap_bucket(ts - history.timestamps[i - 1], session_gap_secs),
        };
        let predicted_moment = history.timestamps.get(i + 1).copied().unwrap_or(predict_at);
        seq.prediction_gaps[j] = gap_bucket(predicted_moment - ts, session_gap_secs);
        seq.prediction_hours[j] = hour_of_week(predicted_moment);
        seq.sessions[j] = i64::from(window_sessions[offset]);
    }
    seq
}

/// Events a window restarted by incremental inference leaves free for appends: each restart
/// recomputes the newest `max_len − slack` events, then that many events are appended before
/// the next (about 1 + (max_len − slack) / slack positions computed per appended event).
pub fn append_slack(max_len: usize) -> usize {
    max_len / 2
}

/// Where incremental inference starts the window over `len` events when no cached keys and
/// values say otherwise: at most `max_len −` [`append_slack`] events back, so that a window
/// computed afresh always has room for that many appends before it must move again (and every
/// position be recomputed). A window computed for a history at or near `max_len` (a user's
/// first request to a fresh server, or one whose cached keys were evicted) would otherwise be
/// recomputed again at the very next event.
pub fn fresh_window_start(len: usize, max_len: usize) -> usize {
    len.saturating_sub(max_len - append_slack(max_len))
}

/// Which events of a history a model reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum WindowPolicy {
    /// The newest `max_len` events: what a full forward pass per request reads.
    #[default]
    Newest,
    /// The window incremental serving settles into for a user who asks after every event: the
    /// whole history while it fits, then restarted [`fresh_window_start`]'s way each time it
    /// would exceed `max_len` (windows of `max_len −` [`append_slack`] to `max_len` events). The
    /// quality cost of serving incrementally is the difference to [`Self::Newest`].
    Served,
    /// The window a server computes for a user on their first request, whatever came before
    /// ([`fresh_window_start`]): what a freshly started server answers for a model that appends.
    FirstVisit,
}

impl WindowPolicy {
    /// Index of the window's first event in a history of `len` events.
    pub fn start(self, len: usize, max_len: usize) -> usize {
        match self {
            Self::Newest => len.saturating_sub(max_len),
            Self::Served if len <= max_len => 0,
            Self::Served => {
                // Each restart moves the start by the slack and the event that overflowed.
                let step = append_slack(max_len) + 1;
                (len - max_len).div_ceil(step) * step
            }
            Self::FirstVisit => fresh_window_start(len, max_len),
        }
    }
}

/// Events a server keeps per user for a model of window `max_len`: the window and the event
/// before it, whose time the window's first position reads (its gap input; with the window
/// alone, a full window's first gap read "none" where offline scoring of the whole history
/// reads the real one); where the model appends, the window's slack instead, so that a window
/// restarted short of full keeps its first event in memory while it grows back to `max_len`.
pub fn events_to_keep(max_len: usize, appendable: bool) -> usize {
    match appendable {
        true => max_len + append_slack(max_len).max(1),
        false => max_len + 1,
    }
}

impl EncodedSeq {
    /// Number of real (non-padding) positions.
    pub fn real_len(&self) -> usize {
        self.items.iter().rev().take_while(|&&item| item != 0).count()
    }
}

/// A batch of encoded rows as `[B, L]` int64 tensors on one device.
#[derive(Debug)]
pub struct Batch {
    pub items: Tensor,
    pub types: Tensor,
    pub gaps: Tensor,
    pub prediction_gaps: Tensor,
    pub sessions: Tensor,
    pub prediction_hours: Tensor,
    /// Real events per row, on the host: what a batch's shape depends on is known without
    /// asking the device.
    pub lengths: Vec<i64>,
    /// Every field on the host as well, `[fields, B, L]` in [`Field`] order, for what is built
    /// there (the attention index of a few new positions, the sessions a prefix pool keeps,
    /// the host kernel's inputs).
    host: Vec<i64>,
}

/// The fields of a [`Batch`], in the order its host copy keeps them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Field {
    Items,
    Types,
    Gaps,
    PredictionGaps,
    Sessions,
    PredictionHours,
}

impl Field {
    const ALL: [Field; 6] = [
        Field::Items,
        Field::Types,
        Field::Gaps,
        Field::PredictionGaps,
        Field::Sessions,
        Field::PredictionHours,
    ];

    fn of(self, row: &EncodedSeq) -> &[i64] {
        match self {
            Field::Items => &row.items,
            Field::Types => &row.types,
            Field::Gaps => &row.gaps,
            Field::PredictionGaps => &row.prediction_gaps,
            Field::Sessions => &row.sessions,
            Field::PredictionHours => &row.prediction_hours,
        }
    }
}

impl Batch {
    /// Rows of equal length, as they are.
    pub fn new<R: Borrow<EncodedSeq>>(rows: &[R], device: Device) -> Self {
        let width = rows.first().map_or(0, |r| r.borrow().items.len());
        Self::last_columns(rows, width, device)
    }

    /// Only the columns where some row has a real event: attention never reads padding and
    /// positions are counted from the right, so the result is the same at a fraction of the cost.
    pub fn trimmed<R: Borrow<EncodedSeq>>(rows: &[R], device: Device) -> Self {
        let width = rows.iter().map(|r| r.borrow().real_len()).max().unwrap_or(0).max(1);
        Self::last_columns(rows, width, device)
    }

    /// The last `width` columns of every row. All fields travel to the device as one
    /// `[fields, B, width]` host tensor: one copy per batch, from pinned memory and asynchronous
    /// on CUDA, instead of one pageable copy per field.
    pub fn last_columns<R: Borrow<EncodedSeq>>(rows: &[R], width: usize, device: Device) -> Self {
        let mut flat = Vec::with_capacity(Field::ALL.len() * rows.len() * width);
        for field in Field::ALL {
            for row in rows {
                let values = field.of(row.borrow());
                flat.extend_from_slice(&values[values.len() - width..]);
            }
        }
        let host = Tensor::from_slice(&flat).view([Field::ALL.len() as i64, rows.len() as i64, width as i64]);
        let all = to_device_pinned(host, device);
        Self {
            lengths: rows.iter().map(|r| r.borrow().real_len().min(width) as i64).collect(),
            host: flat,
            items: all.get(Field::Items as i64),
            types: all.get(Field::Types as i64),
            gaps: all.get(Field::Gaps as i64),
            prediction_gaps: all.get(Field::PredictionGaps as i64),
            sessions: all.get(Field::Sessions as i64),
            prediction_hours: all.get(Field::PredictionHours as i64),
        }
    }

    pub fn size(&self) -> i64 {
        self.items.size()[0]
    }

    /// Rows `start..start + len` as a batch of their own, columns unchanged.
    pub fn rows(&self, start: usize, len: usize) -> Batch {
        let (rows, width) = (self.size() as usize, self.seq_len() as usize);
        let host = Field::ALL
            .iter()
            .flat_map(|&field| {
                let at = (field as usize * rows + start) * width;
                self.host[at..at + len * width].iter().copied()
            })
            .collect();
        let narrow = |tensor: &Tensor| tensor.narrow(0, start as i64, len as i64);
        Batch {
            items: narrow(&self.items),
            types: narrow(&self.types),
            gaps: narrow(&self.gaps),
            prediction_gaps: narrow(&self.prediction_gaps),
            sessions: narrow(&self.sessions),
            prediction_hours: narrow(&self.prediction_hours),
            lengths: self.lengths[start..start + len].to_vec(),
            host,
        }
    }

    pub fn seq_len(&self) -> i64 {
        self.items.size()[1]
    }

    /// `[B, L]` bool: which positions hold a real event.
    pub fn real_mask(&self) -> Tensor {
        self.items.ne(0)
    }

    pub fn device(&self) -> Device {
        self.items.device()
    }

    /// `field` of row `row`'s last `m` columns, from the host copy.
    pub fn row_field(&self, field: Field, row: usize, m: usize) -> &[i64] {
        let (rows, width) = (self.size() as usize, self.seq_len() as usize);
        let at = (field as usize * rows + row) * width;
        &self.host[at + width - m..at + width]
    }

    /// Session indices of row `row`'s last `m` columns.
    pub fn row_sessions(&self, row: usize, m: usize) -> &[i64] {
        self.row_field(Field::Sessions, row, m)
    }

    /// Session indices of every row, row after row (`[B × L]`).
    pub fn host_sessions(&self) -> &[i64] {
        let len = (self.size() * self.seq_len()) as usize;
        &self.host[Field::Sessions as usize * len..][..len]
    }
}

/// `[B, L]` int64 tensor from rows of equal length.
pub fn stack_rows<'a>(rows: impl ExactSizeIterator<Item = &'a [i64]>, device: Device) -> Tensor {
    let batch = rows.len() as i64;
    let flat: Vec<i64> = rows.flatten().copied().collect();
    let width = if batch == 0 { 0 } else { flat.len() as i64 / batch };
    to_device_pinned(Tensor::from_slice(&flat).view([batch, width]), device)
}

/// A tensor's values as f32 on the host, row-major (weights, hidden states).
pub fn to_host_f32(tensor: &Tensor) -> Vec<f32> {
    Vec::<f32>::try_from(
        tensor
            .detach()
            .to_kind(Kind::Float)
            .to_device(Device::Cpu)
            .reshape([-1]),
    )
    .expect("f32 values")
}

/// A tensor's values read in place, without a copy: `None` unless it is contiguous fp32 in host
/// memory. The borrow keeps the tensor alive; callers read tensors nothing writes meanwhile (a
/// serving model's weights, a pass's own scores).
pub fn host_f32_view(tensor: &Tensor) -> Option<&[f32]> {
    let fits = tensor.device() == Device::Cpu && tensor.kind() == Kind::Float && tensor.is_contiguous();
    // SAFETY: a contiguous fp32 host tensor holds `numel` values from `data_ptr`, alive for the
    // borrow of `tensor`.
    fits.then(|| unsafe { std::slice::from_raw_parts(tensor.data_ptr() as *const f32, tensor.numel()) })
}

/// Moves a freshly built host tensor to `device`. On CUDA it goes through page-locked memory
/// (libtorch's caching host allocator recycles those blocks) so the copy is a single DMA that
/// does not block the host; the allocator keeps the block alive until the copy has finished.
pub fn to_device_pinned(host: Tensor, device: Device) -> Tensor {
    match device {
        Device::Cuda(_) => host.pin_memory(device).to_device_(device, host.kind(), true, false),
        _ => host.to_device(device),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// The cache's rule: moments with the same key encode to the very same row, but for
        /// the hours of prediction where only the clock readout reads them (added after the
        /// cache; tests/model.rs holds the state before it to the same rule).
        #[test]
        fn moments_with_the_same_key_encode_identically(
            gaps in prop::collection::vec(0i64..200_000, 0..12),
            first in 0i64..1_000_000_000,
            moments in prop::collection::vec(0i64..3_000_000, 2..6),
            max_len in 1usize..8,
            session_gap_secs in 60i64..7200,
            calendar in any::<bool>(),
        ) {
            let timestamps: Vec<i64> = gaps.iter().scan(first, |t, g| { *t += g; Some(*t) }).collect();
            let items: Vec<u32> = (1..=timestamps.len() as u32).collect();
            let types = vec![1u32; items.len()];
            let view = || HistoryView::new(&items, &timestamps, &types);
            let features = Features { calendar, ..Features::default() };
            let encoded = |at| {
                let mut row = encode(view(), at, max_len, session_gap_secs);
                if !calendar {
                    row.prediction_hours.clear();
                }
                row
            };
            let last = timestamps.last().copied().unwrap_or(first);
            for a in &moments {
                for b in &moments {
                    let (at_a, at_b) = (last + a, last + b);
                    let key = |at| moment_key(view(), at, &features, session_gap_secs);
                    if key(at_a) == key(at_b) {
                        prop_assert_eq!(encoded(at_a), encoded(at_b));
                    }
                }
            }
        }
    }

    #[test]
    fn encodes_left_padded_with_gaps_sessions_and_prediction_gap() {
        let items = [5, 6, 7];
        let ts = [100, 110, 10_000];
        let types = [1, 2, 1];
        let seq = encode(HistoryView::new(&items, &ts, &types), 10_005, 5, 1800);
        assert_eq!(seq.items, [0, 0, 5, 6, 7]);
        assert_eq!(seq.types, [0, 0, 1, 2, 1]);
        assert_eq!(
            seq.gaps,
            [0, 0, GAP_BUCKET_NONE, gap_bucket(10, 1800), gap_bucket(9890, 1800)]
        );
        assert_eq!(
            seq.prediction_gaps,
            [0, 0, gap_bucket(10, 1800), gap_bucket(9890, 1800), gap_bucket(5, 1800)]
        );
        assert_eq!(seq.sessions, [0, 0, 0, 0, 1]);
        let hours = [0, 0, hour_of_week(110), hour_of_week(10_000), hour_of_week(10_005)];
        assert_eq!(seq.prediction_hours, hours);
    }

    #[test]
    fn truncation_keeps_newest_events_and_true_gap_of_first_kept_event() {
        let items = [1, 2, 3, 4];
        let ts = [0, 10, 20, 40];
        let types = [1; 4];
        let seq = encode(HistoryView::new(&items, &ts, &types), 50, 2, 1800);
        assert_eq!(seq.items, [3, 4]);
        assert_eq!(seq.gaps, [gap_bucket(10, 1800), gap_bucket(20, 1800)]);
    }

    #[test]
    fn the_served_window_is_where_restarts_after_every_event_leave_it() {
        for max_len in [1usize, 2, 5, 8, 50] {
            let mut start = 0;
            for len in 1..10 * max_len {
                if len - start > max_len {
                    start = fresh_window_start(len, max_len);
                }
                assert_eq!(
                    WindowPolicy::Served.start(len, max_len),
                    start,
                    "len {len}, max_len {max_len}"
                );
                assert_eq!(WindowPolicy::Newest.start(len, max_len), len.saturating_sub(max_len));
            }
        }
    }
}
