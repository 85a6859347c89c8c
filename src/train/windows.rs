//! Training examples: each user's training events cut into windows of at most `max_len`
//! next-item targets, newest first, encoded once before training starts.
use crate::data::split::SequenceSet;
use crate::model::{encode, EncodedSeq, HistoryView};

/// One encoded input row and the item each position must predict (0 = no target).
#[derive(Debug, Clone, PartialEq)]
pub struct Window {
    pub input: EncodedSeq,
    pub targets: Vec<i64>,
    /// The user (index in the set) and the first of their events the input reads: the events
    /// before it are history the window does not show.
    pub user: usize,
    pub first_event: usize,
}

/// Windows over every user's training prefix. A window whose last target is event `b` reads
/// events `b − max_len .. b − 1` and predicts events `b − max_len + 1 ..= b`.
pub fn training_windows(set: &SequenceSet, max_len: usize, session_gap_secs: i64) -> Vec<Window> {
    let mut windows = Vec::new();
    for (index, user) in set.users.iter().enumerate() {
        let history = HistoryView::new(&user.items, &user.timestamps, &user.types).prefix(user.train_len());
        let mut last_target = history.len();
        while last_target >= 2 {
            let b = last_target - 1;
            let input = encode(history.prefix(b), history.timestamps[b], max_len, session_gap_secs);
            let len = b.min(max_len);
            let mut targets = vec![0i64; max_len];
            for (slot, event) in (b + 1 - len..=b).enumerate() {
                targets[max_len - len + slot] = i64::from(history.items[event]);
            }
            windows.push(Window {
                input,
                targets,
                user: index,
                first_event: b - len,
            });
            last_target = last_target.saturating_sub(max_len);
        }
    }
    windows
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::split::build_sequences;
    use crate::data::vocab::Vocab;
    use crate::data::Event;

    #[test]
    fn windows_cover_every_training_target_once() {
        // 9 events → 7 training events → targets are events 1..=6.
        let events: Vec<Event> = (0..9)
            .map(|t| Event {
                user_id: "u".into(),
                item_id: format!("i{t}"),
                timestamp: t * 10,
                event_type: None,
            })
            .collect();
        let set = build_sequences(&events, Vocab::new(), Vocab::new(), true);
        let windows = training_windows(&set, 4, 1800);
        assert_eq!(windows.len(), 2);
        // Newest window: inputs events 2..=5 (items 3..=6), targets events 3..=6 (items 4..=7).
        assert_eq!(windows[0].input.items, [3, 4, 5, 6]);
        assert_eq!(windows[0].targets, [4, 5, 6, 7]);
        // Older window: inputs event 0..=1, targets events 1..=2, left-padded.
        assert_eq!(windows[1].input.items, [0, 0, 1, 2]);
        assert_eq!(windows[1].targets, [0, 0, 2, 3]);
        assert_eq!(windows[1].input.real_len(), 2);
        assert_eq!((windows[0].first_event, windows[1].first_event), (2, 0));
    }
}
