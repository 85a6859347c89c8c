//! Per-user chronological sequences and the leave-one-out split.
//!
//! Events are grouped by user and sorted by timestamp with a *stable* sort, so events sharing a
//! timestamp keep their file order. Split: each user's last event is the test target, the one
//! before it the validation target, the rest train. Users with fewer than 3 events have no
//! validation or test target; all of their events are training data.
use std::collections::HashMap;

use super::event::Event;
use super::vocab::Vocab;

/// One user's events in time order, as dense indices.
#[derive(Debug, Clone, PartialEq)]
pub struct UserSequence {
    pub user_id: String,
    pub items: Vec<u32>,
    pub timestamps: Vec<i64>,
    /// Event-type indices; 1 ("none") when the data has no types.
    pub types: Vec<u32>,
}

/// Which of a user's events an evaluation predicts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    Validation,
    Test,
}

impl UserSequence {
    pub fn len(&self) -> usize {
        self.items.len()
    }

    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    /// Number of leading events used for training.
    pub fn train_len(&self) -> usize {
        if self.len() >= 3 {
            self.len() - 2
        } else {
            self.len()
        }
    }

    /// Position of the event that `target` predicts; its input is every event before it.
    pub fn target_position(&self, target: Target) -> Option<usize> {
        (self.len() >= 3).then(|| match target {
            Target::Validation => self.len() - 2,
            Target::Test => self.len() - 1,
        })
    }
}

/// Sequences plus the vocabularies that index them.
#[derive(Debug, Clone)]
pub struct SequenceSet {
    pub users: Vec<UserSequence>,
    pub items: Vocab,
    pub event_types: Vocab,
    /// Events dropped because their item is not in a fixed vocabulary.
    pub unknown_item_events: usize,
}

/// The type every untyped event gets, so that index 1 always exists.
pub const NO_EVENT_TYPE: &str = "";

/// Groups events by user (users in order of first appearance), sorted stably by time.
///
/// With `grow_vocab` the item vocabulary takes in every new item (training); otherwise events of
/// unknown items are dropped and counted (evaluating a trained model on new data).
pub fn build_sequences(events: &[Event], mut items: Vocab, mut event_types: Vocab, grow_vocab: bool) -> SequenceSet {
    if event_types.is_empty() {
        event_types.insert(NO_EVENT_TYPE);
    }
    let mut user_index: HashMap<&str, usize> = HashMap::new();
    let mut grouped: Vec<Vec<&Event>> = Vec::new();
    for event in events {
        let slot = *user_index.entry(&event.user_id).or_insert_with(|| {
            grouped.push(Vec::new());
            grouped.len() - 1
        });
        grouped[slot].push(event);
    }
    let mut unknown_item_events = 0;
    let mut users = Vec::with_capacity(grouped.len());
    for mut user_events in grouped {
        user_events.sort_by_key(|e| e.timestamp);
        let mut seq = UserSequence {
            user_id: user_events[0].user_id.clone(),
            items: Vec::with_capacity(user_events.len()),
            timestamps: Vec::with_capacity(user_events.len()),
            types: Vec::with_capacity(user_events.len()),
        };
        for e in user_events {
            let item = if grow_vocab {
                Some(items.insert(&e.item_id))
            } else {
                items.get(&e.item_id)
            };
            let Some(item) = item else {
                unknown_item_events += 1;
                continue;
            };
            let type_name = e.event_type.as_deref().unwrap_or(NO_EVENT_TYPE);
            let event_type = if grow_vocab {
                event_types.insert(type_name)
            } else {
                event_types.get(type_name).unwrap_or(1)
            };
            seq.items.push(item);
            seq.timestamps.push(e.timestamp);
            seq.types.push(event_type);
        }
        if !seq.is_empty() {
            users.push(seq);
        }
    }
    SequenceSet {
        users,
        items,
        event_types,
        unknown_item_events,
    }
}

impl SequenceSet {
    /// Training-event count per item index (index 0 stays 0).
    pub fn train_item_counts(&self) -> Vec<u64> {
        let mut counts = vec![0u64; self.items.len()];
        for user in &self.users {
            for &item in &user.items[..user.train_len()] {
                counts[item as usize] += 1;
            }
        }
        counts
    }

    pub fn num_events(&self) -> usize {
        self.users.iter().map(UserSequence::len).sum()
    }

    /// Whether the data carries event types beyond "none".
    pub fn has_event_types(&self) -> bool {
        self.event_types.ids().iter().any(|t| t != NO_EVENT_TYPE)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(user: &str, item: &str, ts: i64) -> Event {
        Event {
            user_id: user.into(),
            item_id: item.into(),
            timestamp: ts,
            event_type: None,
        }
    }

    #[test]
    fn groups_by_user_and_sorts_stably_by_time() {
        let events = vec![
            ev("u1", "a", 30),
            ev("u2", "x", 5),
            ev("u1", "b", 10),
            ev("u1", "c", 30),
            ev("u1", "d", 20),
        ];
        let set = build_sequences(&events, Vocab::new(), Vocab::new(), true);
        assert_eq!(set.users.len(), 2);
        let u1 = &set.users[0];
        let names: Vec<&str> = u1.items.iter().map(|&i| set.items.id(i)).collect();
        // "a" and "c" tie at 30: file order kept.
        assert_eq!(names, ["b", "d", "a", "c"]);
        assert_eq!(u1.timestamps, [10, 20, 30, 30]);
        assert!(!set.has_event_types());
    }

    #[test]
    fn leave_one_out_positions() {
        let events: Vec<Event> = (0..5).map(|t| ev("u", &format!("i{t}"), t)).collect();
        let set = build_sequences(&events, Vocab::new(), Vocab::new(), true);
        let u = &set.users[0];
        assert_eq!(u.train_len(), 3);
        assert_eq!(u.target_position(Target::Validation), Some(3));
        assert_eq!(u.target_position(Target::Test), Some(4));
        assert_eq!(set.train_item_counts().iter().sum::<u64>(), 3);
    }

    #[test]
    fn short_users_are_training_only() {
        let events = vec![ev("u", "a", 1), ev("u", "b", 2)];
        let set = build_sequences(&events, Vocab::new(), Vocab::new(), true);
        let u = &set.users[0];
        assert_eq!(u.train_len(), 2);
        assert_eq!(u.target_position(Target::Test), None);
        assert_eq!(u.target_position(Target::Validation), None);
    }

    #[test]
    fn fixed_vocab_drops_unknown_items() {
        let items = Vocab::from_ids(["a".to_string()]);
        let events = vec![ev("u", "a", 1), ev("u", "zzz", 2)];
        let set = build_sequences(&events, items, Vocab::new(), false);
        assert_eq!(set.users[0].items, [1]);
        assert_eq!(set.unknown_item_events, 1);
        assert_eq!(set.items.len(), 2);
    }
}
