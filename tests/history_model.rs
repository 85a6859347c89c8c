//! Any interleaving of ingest, erasure and restart keeps the durable histories equal to a plain
//! model: every user's events sorted by time (ties in arrival order), the newest `cap` of them in
//! memory, the distinct known items of the older ones remembered, erased users empty, and a
//! restart changing nothing — with or without a memory budget small enough that users keep
//! leaving memory and being read back.
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use proptest::prelude::*;
use xsrec::history::{
    Histories, HistoryStore, Journal, JournalConfig, LoggedEvent, MemoryBudget, NewEvent, StoredEvent,
};

const USERS: usize = 3;

#[derive(Debug, Clone)]
enum Op {
    /// One call: per user, events as (timestamp, item).
    Append(Vec<(usize, Vec<(i64, u8)>)>),
    Erase(usize),
    Restart,
}

fn op() -> impl Strategy<Value = Op> {
    let events = prop::collection::vec((0i64..40, 0u8..6), 1..6);
    prop_oneof![
        6 => prop::collection::vec((0..USERS, events), 1..3).prop_map(Op::Append),
        1 => (0..USERS).prop_map(Op::Erase),
        1 => Just(Op::Restart),
    ]
}

/// What memory serves of a user: its events as (timestamp, item id), and the earlier items.
type Served = (Vec<(i64, String)>, Vec<u32>);

/// The model: every event of every user with its arrival number.
#[derive(Default)]
struct Model {
    events: BTreeMap<usize, Vec<(i64, u64, u8)>>,
    arrivals: u64,
}

impl Model {
    /// What memory must hold for `user`: sorted by (time, arrival), the newest `cap`; and the
    /// known items (item 0 is unknown) of the older events, each once, ascending.
    fn served(&self, user: usize, cap: usize) -> Option<Served> {
        let mut events = self.events.get(&user)?.clone();
        events.sort();
        let skip = events.len().saturating_sub(cap);
        let mut earlier: Vec<u32> = events[..skip]
            .iter()
            .map(|&(_, _, item)| u32::from(item))
            .filter(|&item| item != 0)
            .collect();
        earlier.sort_unstable();
        earlier.dedup();
        let newest = events[skip..]
            .iter()
            .map(|&(t, _, item)| (t, format!("i{item}")))
            .collect();
        Some((newest, earlier))
    }
}

fn resolve(logged: &LoggedEvent) -> StoredEvent {
    StoredEvent {
        item: logged.item_id[1..].parse().expect("ids are i<number>"),
        item_id: logged.item_id.clone(),
        timestamp: logged.timestamp,
        event_type: 0,
    }
}

fn open(dir: &Path, cap: usize, budget: Option<usize>) -> Histories {
    let journal = Journal::open(JournalConfig::offline(dir.to_path_buf())).expect("open the journal");
    let mut histories = Histories::with_journal(2, cap, Some(journal));
    if let Some(max_bytes) = budget {
        let budget = MemoryBudget {
            max_bytes,
            resolve: Arc::new(resolve),
        };
        histories = histories.with_budget(budget).expect("a journal is attached");
    }
    histories.recover(resolve).expect("recover");
    histories
}

fn served(histories: &Histories, user: usize) -> Option<Served> {
    let snapshot = histories.snapshot(&format!("u{user}")).expect("the store reads")?;
    let events = snapshot
        .events
        .iter()
        .map(|e| (e.timestamp, e.item_id.to_string()))
        .collect();
    Some((events, snapshot.earlier_items))
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 128, ..ProptestConfig::default() })]

    #[test]
    fn histories_equal_the_model_through_any_interleaving(
        cap in 1usize..6,
        budget in prop::option::of(0usize..1_500),
        ops in prop::collection::vec(op(), 1..25),
    ) {
        let dir = tempfile::tempdir().unwrap();
        let mut histories = open(dir.path(), cap, budget);
        let mut model = Model::default();
        for op in ops {
            match op {
                Op::Append(calls) => {
                    let mut writes = Vec::new();
                    for (user, events) in calls {
                        let new: Vec<NewEvent> = events
                            .iter()
                            .map(|&(timestamp, item)| {
                                model.arrivals += 1;
                                model.events.entry(user).or_default().push((timestamp, model.arrivals, item));
                                NewEvent {
                                    event: StoredEvent { item: u32::from(item), item_id: format!("i{item}").into(), timestamp, event_type: 0 },
                                    type_id: None,
                                }
                            })
                            .collect();
                        writes.push((Arc::from(format!("u{user}")), new));
                    }
                    histories.append(writes).wait_blocking().unwrap();
                }
                Op::Erase(user) => {
                    let removed = histories.remove(&format!("u{user}"));
                    prop_assert_eq!(removed.is_some(), model.events.remove(&user).is_some());
                    if let Some((_, commit)) = removed {
                        commit.wait_blocking().unwrap();
                    }
                }
                Op::Restart => {
                    histories.journal().unwrap().close();
                    histories = open(dir.path(), cap, budget);
                }
            }
            for user in 0..USERS {
                prop_assert_eq!(served(&histories, user), model.served(user, cap), "user {}", user);
            }
        }
        histories.journal().unwrap().close();
    }
}
