//! Scorers that read the raw history instead of a network's encoded input: the synthetic
//! family's oracle, and the last-item-plus-gap transition baseline that any cross-session model
//! has to beat.
use std::collections::HashMap;

use tch::{Kind, Tensor};

use super::{CaseResult, CaseScorer, EvalOptions};
use crate::data::family::oracle::{Observed, Oracle};
use crate::data::family::{FamilyLog, Pattern};
use crate::data::session::starts_new_session;
use crate::data::split::SequenceSet;
use crate::data::synth::item_index;

/// The family's oracle over a sequence set built from that family's log.
pub struct OracleScorer<'a> {
    oracle: Oracle<'a>,
    log: &'a FamilyLog,
    knows_the_rule: bool,
}

impl<'a> OracleScorer<'a> {
    /// The oracle: it reads the planted rule.
    pub fn new(log: &'a FamilyLog) -> Self {
        Self {
            oracle: Oracle::new(&log.params),
            log,
            knows_the_rule: true,
        }
    }

    /// Topics known, rule not: see [`Oracle::topics_only_distribution`].
    pub fn topics_only(log: &'a FamilyLog) -> Self {
        Self {
            knows_the_rule: false,
            ..Self::new(log)
        }
    }

    fn mechanism(&self, user_id: &str) -> Pattern {
        let user: usize = user_id
            .strip_prefix('u')
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("`{user_id}` is not a family user id"));
        self.log.mechanisms[user]
    }
}

impl CaseScorer for OracleScorer<'_> {
    fn score_cases(&self, set: &SequenceSet, cases: &[(usize, usize)], opts: &EvalOptions) -> Tensor {
        let item_number: Vec<Option<usize>> = (0..set.items.len() as u32)
            .map(|i| item_index(set.items.id(i)))
            .collect();
        let purchase = set.event_types.get("purchase");
        let mut scores = Vec::with_capacity(cases.len() * set.items.len());
        for &(u, p) in cases {
            let user = &set.users[u];
            let history: Vec<Observed> = (0..p)
                .map(|i| Observed {
                    item: item_number[user.items[i] as usize].expect("family item ids"),
                    timestamp: user.timestamps[i],
                    purchase: Some(user.types[i]) == purchase,
                })
                .collect();
            let at = user.timestamps[p];
            let by_number = match self.knows_the_rule {
                true => self.oracle.item_scores(self.mechanism(&user.user_id), &history, at),
                false => self
                    .oracle
                    .item_scores_for(&self.oracle.topics_only_distribution(&history, at)),
            };
            scores.extend(
                item_number
                    .iter()
                    .map(|n| n.map_or(f32::NEG_INFINITY, |n| by_number[n] as f32)),
            );
        }
        Tensor::from_slice(&scores)
            .view([cases.len() as i64, set.items.len() as i64])
            .to_device(opts.device)
    }
}

/// First-order transitions keyed by the last item and whether the moment of prediction opens
/// a new session: what "the last item plus the gap is long" can know, counted on the training
/// part of every sequence. Ties (and unseen contexts) fall back to popularity.
pub struct TransitionBaseline {
    next: HashMap<(u32, bool), HashMap<u32, u32>>,
    /// Popularity scaled below one count, so it only orders items with equal counts.
    popularity: Vec<f32>,
    session_gap_secs: i64,
}

impl TransitionBaseline {
    pub fn fit(set: &SequenceSet, session_gap_secs: i64) -> Self {
        let mut next: HashMap<(u32, bool), HashMap<u32, u32>> = HashMap::new();
        for user in &set.users {
            for i in 1..user.train_len() {
                let opens = starts_new_session(user.timestamps[i] - user.timestamps[i - 1], session_gap_secs);
                *next
                    .entry((user.items[i - 1], opens))
                    .or_default()
                    .entry(user.items[i])
                    .or_default() += 1;
            }
        }
        let counts = set.train_item_counts();
        let most = counts.iter().copied().max().unwrap_or(0) as f32 + 1.0;
        Self {
            next,
            popularity: counts.iter().map(|&c| c as f32 / most).collect(),
            session_gap_secs,
        }
    }
}

impl CaseScorer for TransitionBaseline {
    fn score_cases(&self, set: &SequenceSet, cases: &[(usize, usize)], opts: &EvalOptions) -> Tensor {
        let mut scores = Vec::with_capacity(cases.len() * self.popularity.len());
        for &(u, p) in cases {
            let user = &set.users[u];
            let opens = starts_new_session(user.timestamps[p] - user.timestamps[p - 1], self.session_gap_secs);
            let start = scores.len();
            scores.extend_from_slice(&self.popularity);
            if let Some(next) = self.next.get(&(user.items[p - 1], opens)) {
                for (&item, &count) in next {
                    scores[start + item as usize] += count as f32;
                }
            }
        }
        Tensor::from_slice(&scores)
            .view([cases.len() as i64, self.popularity.len() as i64])
            .to_kind(Kind::Float)
            .to_device(opts.device)
    }
}

/// Labels each case as a session start by `truth` (the real log) rather than by the set it was
/// evaluated on: a control with flattened time has no session starts of its own.
///
/// # Panics
/// If `truth` does not hold the same users in the same order.
pub fn label_sessions_from(results: &mut [CaseResult], truth: &SequenceSet, session_gap_secs: i64) {
    for case in results {
        let (user, p) = (&truth.users[case.user], case.position);
        case.new_session = starts_new_session(user.timestamps[p] - user.timestamps[p - 1], session_gap_secs);
    }
}

#[cfg(test)]
mod tests {
    use tch::Device;

    use super::*;
    use crate::data::family::{flatten_time, generate, FamilyParams};
    use crate::data::split::{build_sequences, Target};
    use crate::data::vocab::Vocab;
    use crate::data::Event;
    use crate::eval::evaluate;

    fn options(exclude_seen: bool) -> EvalOptions {
        EvalOptions {
            target: Target::Test,
            exclude_seen,
            batch_size: 7,
            max_len: 50,
            session_gap_secs: 1800,
            device: Device::Cpu,
            window: crate::model::WindowPolicy::Newest,
        }
    }

    fn event(user: &str, item: &str, timestamp: i64) -> Event {
        Event {
            user_id: user.into(),
            item_id: item.into(),
            timestamp,
            event_type: None,
        }
    }

    #[test]
    fn transitions_are_counted_per_last_item_and_session_start() {
        // Training parts (each user's events but the last two): u: a b a b inside one session,
        // so a→b twice and b→a once; v: a, then c after a break, so a→c once across sessions.
        // Popularity a 3, b 2, c 1, x 0, scaled by 1 / (3 + 1).
        let events = vec![
            event("u", "a", 0),
            event("u", "b", 10),
            event("u", "a", 20),
            event("u", "b", 30),
            event("u", "x", 40),
            event("u", "a", 50),
            event("v", "a", 0),
            event("v", "c", 9000),
            event("v", "x", 9010),
            event("v", "a", 20_000),
        ];
        let set = build_sequences(&events, Vocab::new(), Vocab::new(), true);
        let baseline = TransitionBaseline::fit(&set, 1800);
        // (user, target position): after u's b (same session), after u's a (same session),
        // after v's a (the target opens a session).
        let cases = [(0, 2), (0, 1), (1, 1)];
        let scores = Vec::<f32>::try_from(baseline.score_cases(&set, &cases, &options(false)).view(-1)).unwrap();
        let width = set.items.len();
        let score = |case: usize, id: &str| scores[case * width + set.items.get(id).unwrap() as usize];
        let expected = [
            [("a", 1.0 + 0.75), ("b", 0.5), ("c", 0.25), ("x", 0.0)],
            [("a", 0.75), ("b", 2.0 + 0.5), ("c", 0.25), ("x", 0.0)],
            [("a", 0.75), ("b", 0.5), ("c", 1.0 + 0.25), ("x", 0.0)],
        ];
        for (case, row) in expected.iter().enumerate() {
            for &(id, want) in row {
                assert!(
                    (score(case, id) - want).abs() < 1e-6,
                    "case {case} item {id}: {}",
                    score(case, id)
                );
            }
        }
    }

    #[test]
    fn the_oracle_ranks_through_evaluation_as_it_scores_directly() {
        let log = generate(&FamilyParams {
            users: 60,
            ..FamilyParams::draw(crate::data::family::Pattern::Mixture, 9)
        });
        let set = build_sequences(&log.events, Vocab::new(), Vocab::new(), true);
        let scorer = OracleScorer::new(&log);
        let oracle = Oracle::new(&log.params);
        for exclude_seen in [false, true] {
            let results = evaluate(&scorer, &set, &options(exclude_seen));
            assert_eq!(results.len(), 60);
            for case in &results {
                let user = &set.users[case.user];
                let history: Vec<Observed> = (0..case.position)
                    .map(|i| Observed {
                        item: item_index(set.items.id(user.items[i])).unwrap(),
                        timestamp: user.timestamps[i],
                        purchase: set.event_types.id(user.types[i]) == "purchase",
                    })
                    .collect();
                let scores = oracle.item_scores(log.mechanisms[case.user], &history, user.timestamps[case.position]);
                let target = user.items[case.position];
                let score = |i: u32| scores[item_index(set.items.id(i)).unwrap()] as f32;
                let seen = |i: u32| exclude_seen && i != target && user.items[..case.position].contains(&i);
                let rank = (1..set.items.len() as u32)
                    .filter(|&i| !seen(i) && score(i) >= score(target))
                    .count()
                    - 1;
                assert_eq!(case.rank, rank, "user {}", user.user_id);
            }
        }
    }

    #[test]
    fn a_control_is_labelled_by_the_real_sessions() {
        let log = generate(&FamilyParams {
            users: 80,
            ..FamilyParams::draw(crate::data::family::Pattern::Return, 2)
        });
        let real = build_sequences(&log.events, Vocab::new(), Vocab::new(), true);
        let control = build_sequences(
            &flatten_time(&log.events),
            real.items.clone(),
            real.event_types.clone(),
            false,
        );
        let popularity = crate::model::Popularity::new(&real.train_item_counts(), Device::Cpu);
        let on_real = evaluate(&popularity, &real, &options(true));
        let mut on_control = evaluate(&popularity, &control, &options(true));
        assert!(
            on_control.iter().all(|c| !c.new_session),
            "flattened time has no session starts"
        );
        label_sessions_from(&mut on_control, &real, 1800);
        assert_eq!(on_control, on_real);
        assert!(on_real.iter().any(|c| c.new_session));
    }
}
