//! Synthetic event logs with planted structure, for tests and scale benchmarks.
//!
//! Items `i0..i{items-1}` fall into interest clusters (`cluster_of_item`); popularity is Zipf-like
//! by item number, so low numbers are popular and every cluster has a head and a tail. Each user
//! (`u0`, `u1`, …) has a few interest clusters that persist across sessions and occasionally
//! drift. A session draws all its items from one active cluster, with gaps of tens of seconds to
//! a few minutes; sessions are separated by hours to weeks of inactivity.
//!
//! The planted cross-session rule: the active cluster of a new session is
//! `next_cluster(cfg)[previous active cluster]` with probability [`NEXT_CLUSTER_PROBABILITY`],
//! otherwise one of the user's interests. The first item of a session is therefore predictable
//! only by a model that knows a new session starts and what the previous session was about.
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::Event;

/// How often a new session follows the planted cluster-to-cluster rule.
pub const NEXT_CLUSTER_PROBABILITY: f64 = 0.9;

/// Interest clusters per user.
const INTERESTS: usize = 3;
/// Chance, after each session, that one interest is replaced by a freshly drawn cluster.
const DRIFT_PROBABILITY: f64 = 0.2;
const ITEM_ZIPF_EXPONENT: f64 = 1.0;
const CLUSTER_ZIPF_EXPONENT: f64 = 0.8;
pub(super) const FIRST_TIMESTAMP: i64 = 1_600_000_000;
/// Users start at different times so that the log is not a single burst.
pub(super) const START_SPREAD_SECS: i64 = 30 * 86_400;
const MEDIAN_SESSION_BREAK_SECS: f64 = 86_400.0;
const SESSION_BREAK_LOG_SIGMA: f64 = 1.2;
const MAX_SESSION_BREAK_SECS: i64 = 90 * 86_400;
const MIN_CLICK_GAP_SECS: f64 = 10.0;
const MAX_CLICK_GAP_SECS: f64 = 300.0;
/// Separate ChaCha streams keep the hidden structure independent of how many events are drawn.
const STRUCTURE_STREAM: u64 = 1;
const EVENT_STREAM: u64 = 0;

#[derive(Debug, Clone)]
pub struct SynthConfig {
    pub users: usize,
    pub items: usize,
    pub seed: u64,
    /// At least 2 and at most `items`.
    pub clusters: usize,
    /// Inclusive range.
    pub sessions_per_user: (usize, usize),
    /// Inclusive range; the lower bound must be at least 1.
    pub events_per_session: (usize, usize),
    /// The inactivity threshold the log respects: gaps inside a session are shorter, gaps between
    /// sessions longer. At least 2.
    pub session_gap_secs: i64,
}

impl SynthConfig {
    pub fn new(users: usize, items: usize, seed: u64) -> Self {
        SynthConfig {
            users,
            items,
            seed,
            clusters: (items / 40).clamp(2, 64),
            sessions_per_user: (2, 6),
            events_per_session: (3, 12),
            session_gap_secs: 1800,
        }
    }

    fn validate(&self) {
        assert!(
            self.clusters >= 2 && self.clusters <= self.items,
            "synth: need 2 <= clusters <= items, got {} clusters for {} items",
            self.clusters,
            self.items
        );
        let (s_lo, s_hi) = self.sessions_per_user;
        let (e_lo, e_hi) = self.events_per_session;
        assert!(s_lo <= s_hi, "synth: empty sessions_per_user range {s_lo}..={s_hi}");
        assert!(
            1 <= e_lo && e_lo <= e_hi,
            "synth: events_per_session {e_lo}..={e_hi} must be a non-empty range starting at 1 or more"
        );
        assert!(
            self.session_gap_secs >= 2,
            "synth: session_gap_secs must be at least 2, got {}",
            self.session_gap_secs
        );
    }
}

/// The interest cluster item `i{item_index}` belongs to.
pub fn cluster_of_item(cfg: &SynthConfig, item_index: usize) -> usize {
    // Round-robin assignment gives every cluster a share of the popular low-numbered items.
    item_index % cfg.clusters
}

/// The planted rule as a table: `next_cluster(cfg)[c]` usually follows a session in cluster `c`.
/// A single cycle through all clusters, so `table[c] != c` and every cluster is reachable.
pub fn next_cluster(cfg: &SynthConfig) -> Vec<usize> {
    let mut rng = ChaCha8Rng::seed_from_u64(cfg.seed);
    rng.set_stream(STRUCTURE_STREAM);
    // Sattolo's algorithm: a uniformly random cyclic permutation.
    let mut table: Vec<usize> = (0..cfg.clusters).collect();
    for i in (1..table.len()).rev() {
        let j = rng.gen_range(0..i);
        table.swap(i, j);
    }
    table
}

/// The number in a synthetic item id: `item_index("i42") == Some(42)`.
pub fn item_index(item_id: &str) -> Option<usize> {
    item_id.strip_prefix('i')?.parse().ok()
}

/// Events grouped by user in the order `u0, u1, …` (user number, not string order) and in
/// strictly increasing time within a user. Deterministic for a config.
///
/// # Panics
/// If the config breaks the constraints documented on [`SynthConfig`].
pub fn synthesize(cfg: &SynthConfig) -> Vec<Event> {
    cfg.validate();
    let world = World::new(cfg);
    let mut rng = ChaCha8Rng::seed_from_u64(cfg.seed);
    rng.set_stream(EVENT_STREAM);
    let mean_sessions = (cfg.sessions_per_user.0 + cfg.sessions_per_user.1) / 2;
    let mean_events = (cfg.events_per_session.0 + cfg.events_per_session.1) / 2;
    let mut events = Vec::with_capacity(cfg.users * mean_sessions * mean_events);
    for user in 0..cfg.users {
        world.user_events(cfg, &mut rng, user, &mut events);
    }
    events
}

/// Everything fixed before users are simulated, precomputed so that an event costs O(log items).
struct World {
    /// Per cluster, cumulative popularity weights of its items in item-number order.
    cluster_items: Vec<Vec<f64>>,
    cluster_weights: Vec<f64>,
    next_cluster: Vec<usize>,
    item_ids: Vec<String>,
}

impl World {
    fn new(cfg: &SynthConfig) -> Self {
        let mut cluster_items = vec![Vec::new(); cfg.clusters];
        for item in 0..cfg.items {
            let cumulative = &mut cluster_items[cluster_of_item(cfg, item)];
            let before = cumulative.last().copied().unwrap_or(0.0);
            cumulative.push(before + zipf_weight(item, ITEM_ZIPF_EXPONENT));
        }
        World {
            cluster_items,
            cluster_weights: cumulative_zipf(cfg.clusters, CLUSTER_ZIPF_EXPONENT),
            next_cluster: next_cluster(cfg),
            item_ids: (0..cfg.items).map(|i| format!("i{i}")).collect(),
        }
    }

    /// The `j`-th item of cluster `c` is item `c + j * clusters` (see [`cluster_of_item`]).
    fn draw_item(&self, cluster: usize, rng: &mut impl Rng) -> usize {
        let j = draw(&self.cluster_items[cluster], rng);
        cluster + j * self.cluster_items.len()
    }

    fn draw_cluster(&self, rng: &mut impl Rng) -> usize {
        draw(&self.cluster_weights, rng)
    }

    fn user_events(&self, cfg: &SynthConfig, rng: &mut impl Rng, user: usize, out: &mut Vec<Event>) {
        let user_id = format!("u{user}");
        let mut interests: Vec<usize> = (0..INTERESTS).map(|_| self.draw_cluster(rng)).collect();
        let mut active = interests[rng.gen_range(0..INTERESTS)];
        let mut now = FIRST_TIMESTAMP + rng.gen_range(0..START_SPREAD_SECS);
        let sessions = rng.gen_range(cfg.sessions_per_user.0..=cfg.sessions_per_user.1);
        for session in 0..sessions {
            if session > 0 {
                now += session_break(rng, cfg.session_gap_secs);
                active = if rng.gen_bool(NEXT_CLUSTER_PROBABILITY) {
                    self.next_cluster[active]
                } else {
                    interests[rng.gen_range(0..INTERESTS)]
                };
            }
            let mut length = rng.gen_range(cfg.events_per_session.0..=cfg.events_per_session.1);
            if session + 1 == sessions {
                // The log ends at an arbitrary moment, often early in a session, so that held-out
                // final events include session starts, as in a live log.
                length = rng.gen_range(1..=length);
            }
            now = self.session(cfg.session_gap_secs, rng, &user_id, (active, now, length), out);
            if rng.gen_bool(DRIFT_PROBABILITY) {
                interests[rng.gen_range(0..INTERESTS)] = self.draw_cluster(rng);
            }
        }
    }

    /// Appends `length` events from `cluster` starting at `start`; returns the time of the last.
    fn session(
        &self,
        session_gap_secs: i64,
        rng: &mut impl Rng,
        user_id: &str,
        (cluster, start, length): (usize, i64, usize),
        out: &mut Vec<Event>,
    ) -> i64 {
        let mut now = start;
        for k in 0..length {
            if k > 0 {
                now += click_gap(rng, session_gap_secs);
            }
            out.push(Event {
                user_id: user_id.to_owned(),
                item_id: self.item_ids[self.draw_item(cluster, rng)].clone(),
                timestamp: now,
                event_type: Some(funnel_step(rng).to_owned()),
            });
        }
        now
    }
}

pub(super) fn zipf_weight(rank: usize, exponent: f64) -> f64 {
    1.0 / ((rank + 1) as f64).powf(exponent)
}

pub(super) fn cumulative_zipf(n: usize, exponent: f64) -> Vec<f64> {
    (0..n)
        .scan(0.0, |sum, rank| {
            *sum += zipf_weight(rank, exponent);
            Some(*sum)
        })
        .collect()
}

/// An index drawn with probability proportional to its weight, given cumulative weights.
pub(super) fn draw(cumulative: &[f64], rng: &mut impl Rng) -> usize {
    let total = cumulative[cumulative.len() - 1];
    let target = rng.gen::<f64>() * total;
    // `min` guards against rounding putting `target` at the very end.
    cumulative.partition_point(|&w| w <= target).min(cumulative.len() - 1)
}

/// Seconds between two events of a session: log-uniform over tens of seconds to minutes,
/// always below the session threshold.
pub(super) fn click_gap(rng: &mut impl Rng, session_gap_secs: i64) -> i64 {
    let ratio = MAX_CLICK_GAP_SECS / MIN_CLICK_GAP_SECS;
    let secs = (MIN_CLICK_GAP_SECS * ratio.powf(rng.gen::<f64>())) as i64;
    secs.clamp(1, session_gap_secs - 1)
}

/// Seconds of inactivity between sessions: the threshold plus a log-normal break of hours to
/// weeks, so it always exceeds the threshold.
fn session_break(rng: &mut impl Rng, session_gap_secs: i64) -> i64 {
    let log_secs = MEDIAN_SESSION_BREAK_SECS.ln() + SESSION_BREAK_LOG_SIGMA * standard_normal(rng);
    let secs = (log_secs.exp() as i64).min(MAX_SESSION_BREAK_SECS);
    session_gap_secs + 1 + secs
}

/// Box–Muller; rand 0.8 alone has no normal distribution.
pub(super) fn standard_normal(rng: &mut impl Rng) -> f64 {
    let u1 = 1.0 - rng.gen::<f64>(); // in (0, 1], so the log is finite
    let u2: f64 = rng.gen();
    (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
}

/// Most events are views; each deeper step of the funnel is rarer.
pub(super) fn funnel_step(rng: &mut impl Rng) -> &'static str {
    match rng.gen::<f64>() {
        x if x < 0.03 => "purchase",
        x if x < 0.10 => "cart",
        x if x < 0.30 => "click",
        _ => "view",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    /// Sessions of one user's events, split where the gap reaches the threshold.
    fn sessions(events: &[Event], gap: i64) -> Vec<&[Event]> {
        let mut out = Vec::new();
        let mut start = 0;
        for i in 1..=events.len() {
            if i == events.len()
                || crate::data::session::starts_new_session(events[i].timestamp - events[i - 1].timestamp, gap)
            {
                out.push(&events[start..i]);
                start = i;
            }
        }
        out
    }

    fn by_user(events: &[Event]) -> Vec<&[Event]> {
        events.chunk_by(|a, b| a.user_id == b.user_id).collect()
    }

    fn cluster(cfg: &SynthConfig, event: &Event) -> usize {
        cluster_of_item(cfg, item_index(&event.item_id).expect("synthetic item id"))
    }

    #[test]
    fn same_seed_same_log_other_seed_other_log() {
        let cfg = SynthConfig::new(50, 400, 7);
        assert_eq!(synthesize(&cfg), synthesize(&cfg));
        let other = SynthConfig { seed: 8, ..cfg.clone() };
        assert_ne!(synthesize(&cfg), synthesize(&other));
    }

    #[test]
    fn default_config_derives_clusters_from_items() {
        assert_eq!(SynthConfig::new(1, 10, 0).clusters, 2);
        assert_eq!(SynthConfig::new(1, 400, 0).clusters, 10);
        assert_eq!(SynthConfig::new(1, 100_000, 0).clusters, 64);
    }

    #[test]
    fn users_are_grouped_in_order_with_increasing_time() {
        let cfg = SynthConfig::new(30, 200, 1);
        let events = synthesize(&cfg);
        let users = by_user(&events);
        assert_eq!(users.len(), cfg.users);
        for (n, user) in users.iter().enumerate() {
            assert_eq!(user[0].user_id, format!("u{n}"));
            assert!(user.windows(2).all(|w| w[0].timestamp < w[1].timestamp));
        }
        let first = events.iter().map(|e| e.timestamp).min().unwrap();
        assert!((FIRST_TIMESTAMP..FIRST_TIMESTAMP + START_SPREAD_SECS).contains(&first));
    }

    #[test]
    fn gaps_respect_the_session_threshold() {
        for gap in [1800, 60] {
            let cfg = SynthConfig {
                session_gap_secs: gap,
                ..SynthConfig::new(300, 500, 3)
            };
            let events = synthesize(&cfg);
            for user in by_user(&events) {
                for w in user.windows(2) {
                    assert_ne!(w[1].timestamp - w[0].timestamp, gap);
                }
                // If a gap fell on the wrong side of the threshold, session counts or lengths
                // would leave their configured ranges.
                let sessions = sessions(user, gap);
                let (lo, hi) = cfg.sessions_per_user;
                assert!((lo..=hi).contains(&sessions.len()), "{} sessions", sessions.len());
                let (lo, hi) = cfg.events_per_session;
                let (last, earlier) = sessions.split_last().unwrap();
                for s in earlier {
                    assert!((lo..=hi).contains(&s.len()), "session of {}", s.len());
                }
                assert!((1..=hi).contains(&last.len()), "final session of {}", last.len());
            }
        }
    }

    #[test]
    fn planted_rule_predicts_most_session_starts() {
        let cfg = SynthConfig::new(2000, 800, 11);
        let next = next_cluster(&cfg);
        let events = synthesize(&cfg);
        let (mut starts, mut followed) = (0, 0);
        for user in by_user(&events) {
            let sessions = sessions(user, cfg.session_gap_secs);
            for s in &sessions {
                assert!(s.iter().all(|e| cluster(&cfg, e) == cluster(&cfg, &s[0])));
            }
            for pair in sessions.windows(2) {
                starts += 1;
                followed += usize::from(cluster(&cfg, &pair[1][0]) == next[cluster(&cfg, &pair[0][0])]);
            }
        }
        let rate = followed as f64 / starts as f64;
        assert!(starts > 4000, "{starts} session starts");
        assert!((0.8..0.97).contains(&rate), "rule followed at {rate}");
    }

    #[test]
    fn next_cluster_is_a_single_cycle() {
        let cfg = SynthConfig::new(1, 2000, 5);
        let next = next_cluster(&cfg);
        let mut c = 0;
        for step in 1..=cfg.clusters {
            c = next[c];
            assert_eq!(c == 0, step == cfg.clusters, "returned to 0 after {step} steps");
        }
    }

    #[test]
    fn popularity_is_skewed() {
        let cfg = SynthConfig::new(2000, 1000, 2);
        let events = synthesize(&cfg);
        let mut counts: HashMap<&str, usize> = HashMap::new();
        for e in &events {
            *counts.entry(&e.item_id).or_default() += 1;
        }
        let mut counts: Vec<usize> = counts.into_values().collect();
        counts.sort_unstable_by(|a, b| b.cmp(a));
        let top: usize = counts[..cfg.items / 10].iter().sum();
        let share = top as f64 / events.len() as f64;
        assert!(share > 0.4, "top 10% of items take {share}");
    }

    #[test]
    fn event_types_follow_a_funnel() {
        let events = synthesize(&SynthConfig::new(500, 300, 4));
        let count = |t: &str| events.iter().filter(|e| e.event_type.as_deref() == Some(t)).count();
        let (view, click, cart, purchase) = (count("view"), count("click"), count("cart"), count("purchase"));
        assert_eq!(view + click + cart + purchase, events.len());
        assert!(view > click && click > cart && cart > purchase && purchase > 0);
    }

    #[test]
    fn item_index_parses_synthetic_ids_only() {
        assert_eq!(item_index("i42"), Some(42));
        assert_eq!(item_index("u42"), None);
        assert_eq!(item_index("i"), None);
    }

    #[test]
    #[should_panic(expected = "synth: need 2 <= clusters <= items, got 2 clusters for 1 items")]
    fn too_few_items_for_the_clusters_panics() {
        synthesize(&SynthConfig::new(1, 1, 0));
    }
}
