//! The reference beside every learned result: a scorer that knows how the family's rules work
//! (and, in a mixture, which rule a user follows) but reads everything user-specific — a user's
//! topics, cycle, long-term interest, clock bands, open intent — from that user's observed
//! history, as a model has to.
use super::{FamilyParams, Pattern, TOPIC_ZIPF};
use crate::data::synth::zipf_weight;

/// One event of a history as the oracle reads it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Observed {
    /// Item number (`i42` is 42).
    pub item: usize,
    pub timestamp: i64,
    pub purchase: bool,
}

/// Share of a new session's probability kept for unseen topics when the rule points at topics
/// the user has shown before but cannot say which.
const UNSEEN_SHARE: f64 = 0.3;
/// Keeps every topic's log-probability finite, so that all items stay ranked.
const FLOOR: f64 = 1e-6;

pub struct Oracle<'a> {
    params: &'a FamilyParams,
    /// Normalised popularity of a topic's items by rank.
    log_rank_weight: Vec<f64>,
    topic_prior: Vec<f64>,
}

impl<'a> Oracle<'a> {
    pub fn new(params: &'a FamilyParams) -> Self {
        let weights: Vec<f64> = (0..params.items_per_topic)
            .map(|rank| zipf_weight(rank, params.item_zipf))
            .collect();
        let total: f64 = weights.iter().sum();
        Oracle {
            params,
            log_rank_weight: weights.iter().map(|w| (w / total).ln()).collect(),
            topic_prior: (0..params.topics).map(|t| zipf_weight(t, TOPIC_ZIPF)).collect(),
        }
    }

    /// Log-probability of each item number being next after `history`, asked at `at`.
    pub fn item_scores(&self, mechanism: Pattern, history: &[Observed], at: i64) -> Vec<f64> {
        self.item_scores_for(&self.topic_distribution(mechanism, history, at))
    }

    /// Log-probability of each item number under a distribution over topics.
    pub fn item_scores_for(&self, topic_distribution: &[f64]) -> Vec<f64> {
        let topics: Vec<f64> = topic_distribution.iter().map(|p| p.max(FLOOR).ln()).collect();
        (0..self.params.items())
            .map(|item| topics[self.params.topic_of(item)] + self.log_rank_weight[item / self.params.topics])
            .collect()
    }

    /// Probability of each topic for the next event.
    pub fn topic_distribution(&self, mechanism: Pattern, history: &[Observed], at: i64) -> Vec<f64> {
        let p = self.params;
        let Some(last) = history.last() else {
            return self.prior_except(&[]);
        };
        let new_session = crate::data::session::starts_new_session(at - last.timestamp, p.session_gap_secs);
        let sessions = self.sessions(history);
        let current = *sessions.last().expect("a non-empty history has a session");
        let rule = if new_session {
            self.next_session(mechanism, &sessions, at - last.timestamp, at)
        } else if mechanism == Pattern::Return {
            self.ending_topic(current)
        } else {
            one_hot(p.topics, self.majority(current))
        };
        let noise = if new_session { p.session_noise } else { p.event_noise };
        rule.iter()
            .map(|r| (1.0 - noise) * r + noise / p.topics as f64)
            .collect()
    }

    /// A rule-free reference: it knows each item's topic but no cross-session rule. Inside a
    /// session it expects the session's topic; at a session start, one of the user's earlier
    /// topics other than the newest session's, by how many sessions each had (popular unseen
    /// topics when there is none). What a model gets from "the user's other interests" alone.
    pub fn topics_only_distribution(&self, history: &[Observed], at: i64) -> Vec<f64> {
        let p = self.params;
        let Some(last) = history.last() else {
            return self.prior_except(&[]);
        };
        let sessions = self.sessions(history);
        let newest = self.majority(sessions.last().expect("a non-empty history has a session"));
        if !crate::data::session::starts_new_session(at - last.timestamp, p.session_gap_secs) {
            return blend(one_hot(p.topics, newest), self.prior_except(&[]), p.event_noise);
        }
        let mut others = vec![0.0; p.topics];
        for session in &sessions {
            let topic = self.majority(session);
            if topic != newest {
                others[topic] += 1.0;
            }
        }
        let expected = match others.iter().any(|&c| c > 0.0) {
            true => normalised(others),
            false => self.prior_except(&[newest]),
        };
        blend(expected, self.prior_except(&[]), p.session_noise)
    }

    fn next_session(&self, mechanism: Pattern, sessions: &[&[Observed]], pause: i64, at: i64) -> Vec<f64> {
        let p = self.params;
        let topics: Vec<usize> = sessions.iter().map(|s| self.majority(s)).collect();
        let previous = *topics.last().expect("at least one session");
        match mechanism {
            Pattern::Rotation => {
                let mut successors = vec![0.0; p.topics];
                for pair in topics.windows(2).filter(|pair| pair[0] == previous) {
                    successors[pair[1]] += 1.0;
                }
                if successors.iter().any(|&c| c > 0.0) {
                    normalised(successors)
                } else if topics.len() == 1 {
                    self.prior_except(&[previous])
                } else {
                    // The cycle is not yet known past `previous`: it either closes (back to the
                    // first topic) or goes on to a topic not shown yet.
                    blend(one_hot(p.topics, topics[0]), self.prior_except(&topics), UNSEEN_SHARE)
                }
            }
            Pattern::Return if pause >= p.absence_secs => {
                let mut home = vec![0.0; p.topics];
                home[self.topic(sessions[0][0])] += 1.0;
                for pair in sessions.windows(2) {
                    let (before, after) = (pair[0], pair[1]);
                    if after[0].timestamp - before[before.len() - 1].timestamp >= p.absence_secs {
                        home[self.topic(after[0])] += 1.0;
                    }
                }
                normalised(home)
            }
            Pattern::Return => self.ending_topic(sessions[sessions.len() - 1]),
            Pattern::Periodic => {
                let band = p.in_day_band(at);
                let band_topic = |day: bool| {
                    let events: Vec<Observed> = sessions
                        .iter()
                        .filter(|s| p.in_day_band(s[0].timestamp) == day)
                        .flat_map(|s| s.iter().copied())
                        .collect();
                    (!events.is_empty()).then(|| self.majority(&events))
                };
                match (band_topic(band), band_topic(!band)) {
                    (Some(topic), _) => one_hot(p.topics, topic),
                    (None, Some(other)) => self.prior_except(&[other]),
                    (None, None) => self.prior_except(&[]),
                }
            }
            Pattern::Funnel => {
                let last = sessions[sessions.len() - 1];
                if !last.iter().any(|e| e.purchase) {
                    return one_hot(p.topics, previous);
                }
                let mut others: Vec<usize> = topics.iter().copied().filter(|&t| t != previous).collect();
                others.sort_unstable();
                others.dedup();
                let mut shown = vec![previous];
                shown.extend(&others);
                if others.is_empty() {
                    return self.prior_except(&shown);
                }
                let mut known = vec![0.0; p.topics];
                for &t in &others {
                    known[t] = 1.0;
                }
                blend(normalised(known), self.prior_except(&shown), UNSEEN_SHARE)
            }
            Pattern::Mixture => unreachable!("the oracle reads a mixture user's own mechanism"),
        }
    }

    /// Where a drifting session is heading: mostly its last event's topic, some weight on its
    /// main topic in case that event was noise.
    fn ending_topic(&self, session: &[Observed]) -> Vec<f64> {
        let last = one_hot(self.params.topics, self.topic(session[session.len() - 1]));
        blend(last, one_hot(self.params.topics, self.majority(session)), 0.3)
    }

    fn topic(&self, event: Observed) -> usize {
        self.params.topic_of(event.item)
    }

    /// The most frequent topic, ties going to the most recent.
    fn majority(&self, events: &[Observed]) -> usize {
        let mut counts = vec![0usize; self.params.topics];
        let mut latest = vec![0usize; self.params.topics];
        for (i, &e) in events.iter().enumerate() {
            counts[self.topic(e)] += 1;
            latest[self.topic(e)] = i;
        }
        (0..self.params.topics)
            .max_by_key(|&t| (counts[t], latest[t]))
            .expect("at least one topic")
    }

    fn sessions<'h>(&self, history: &'h [Observed]) -> Vec<&'h [Observed]> {
        history
            .chunk_by(|a, b| {
                !crate::data::session::starts_new_session(b.timestamp - a.timestamp, self.params.session_gap_secs)
            })
            .collect()
    }

    /// Topic popularity over every topic but `excluded` (all topics if that leaves none).
    fn prior_except(&self, excluded: &[usize]) -> Vec<f64> {
        let kept: Vec<f64> = (0..self.params.topics)
            .map(|t| {
                if excluded.contains(&t) {
                    0.0
                } else {
                    self.topic_prior[t]
                }
            })
            .collect();
        if kept.iter().all(|&w| w == 0.0) {
            normalised(self.topic_prior.clone())
        } else {
            normalised(kept)
        }
    }
}

fn one_hot(n: usize, at: usize) -> Vec<f64> {
    let mut v = vec![0.0; n];
    v[at] = 1.0;
    v
}

fn normalised(mut v: Vec<f64>) -> Vec<f64> {
    let total: f64 = v.iter().sum();
    v.iter_mut().for_each(|x| *x /= total);
    v
}

/// `(1 − share)·a + share·b`.
fn blend(a: Vec<f64>, b: Vec<f64>, share: f64) -> Vec<f64> {
    a.iter().zip(&b).map(|(x, y)| (1.0 - share) * x + share * y).collect()
}
