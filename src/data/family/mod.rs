//! A family of cross-session phenomena: synthetic logs whose next-session interest follows a
//! planted rule, each with parameters drawn from a seed, a control copy with flattened time,
//! and an oracle ([`oracle`]) that reads the rule from a user's observed history.
//!
//! Shared world: items `i0..` fall into `topics` topics (item `n` is in topic `n % topics`, and
//! is that topic's `n / topics`-th most popular item, Zipf within a topic). A user's topics are
//! drawn by a Zipf law over topics. A session shows items of one topic (each event is replaced
//! by a random topic's item with probability `event_noise`); a session's topic ignores the rule
//! with probability `session_noise`. What decides a new session's topic is the pattern:
//!
//! - **rotation**: a user cycles through their own ordered list of topics, one per session;
//! - **return**: after a break of `absence_secs` or more the user returns to their long-term
//!   topic; after a shorter break they continue the topic the last session ended on (inside a
//!   session interest drifts to another topic with probability `drift` per event);
//! - **periodic**: one topic in the day band (08–20 UTC, or Monday–Friday for a weekly period),
//!   another outside it;
//! - **funnel**: a session that contains a purchase closes its intent and the next session opens
//!   another of the user's topics; a session without one is continued by the next;
//! - **mixture**: every user follows one of the four, chosen at random.
//!
//! The first item of a new session is predictable only from the user's earlier sessions, the
//! time since them (or the clock), so a control copy with timestamps flattened to 1 s steps
//! ([`flatten_time`]) hides what the rule reads.
pub mod oracle;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::Serialize;

use super::synth::{
    click_gap, cumulative_zipf, draw, funnel_step, standard_normal, FIRST_TIMESTAMP, START_SPREAD_SECS,
};
use super::Event;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Pattern {
    Rotation,
    Return,
    Periodic,
    Funnel,
    Mixture,
}

impl Pattern {
    /// Every pattern, the mixture last.
    pub const ALL: [Pattern; 5] = [
        Pattern::Rotation,
        Pattern::Return,
        Pattern::Periodic,
        Pattern::Funnel,
        Pattern::Mixture,
    ];
    /// The single mechanisms a mixture draws from.
    pub const MECHANISMS: [Pattern; 4] = [Pattern::Rotation, Pattern::Return, Pattern::Periodic, Pattern::Funnel];

    pub fn name(self) -> &'static str {
        match self {
            Pattern::Rotation => "rotation",
            Pattern::Return => "return",
            Pattern::Periodic => "periodic",
            Pattern::Funnel => "funnel",
            Pattern::Mixture => "mixture",
        }
    }
}

/// What the periodic pattern's clock bands are.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Period {
    /// Day band 08:00–20:00 UTC.
    Day,
    /// Day band Monday–Friday (UTC).
    Week,
}

/// Every parameter of one log, drawn from `(pattern, seed)` by [`FamilyParams::draw`]; fields a
/// pattern does not use are drawn all the same, so a parameter never depends on the pattern.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct FamilyParams {
    pub pattern: Pattern,
    pub seed: u64,
    pub users: usize,
    pub topics: usize,
    pub items_per_topic: usize,
    /// Zipf exponent of item popularity within a topic.
    pub item_zipf: f64,
    /// Inclusive range.
    pub sessions_per_user: (usize, usize),
    /// Inclusive range (the final session is cut short, see [`FINAL_SINGLE_EVENT_SHARE`]).
    pub events_per_session: (usize, usize),
    /// Chance that a session's topic is drawn at random instead of by the rule.
    pub session_noise: f64,
    /// Chance that one event shows a random topic's item.
    pub event_noise: f64,
    /// Inclusive range of how many topics a user has (rotation cycle, funnel intents).
    pub interests: (usize, usize),
    /// Log-normal break between sessions (rotation, periodic, funnel).
    pub median_break_hours: f64,
    pub break_log_sigma: f64,
    /// return: a break at least this long is an absence; shorter breaks are at most a third of it.
    pub absence_secs: i64,
    /// return: share of breaks that are absences.
    pub absence_share: f64,
    /// return: per-event chance that interest drifts to another topic inside a session.
    pub drift: f64,
    /// periodic: the clock band that picks the topic.
    pub period: Period,
    /// funnel: chance that a session contains a purchase.
    pub purchase: f64,
    /// Inactivity that ends a session; every gap in the log is clearly on one side of it.
    pub session_gap_secs: i64,
}

/// Share of users whose final session is cut to its first event, so that held-out final events
/// include many session starts (the events this family is about).
pub const FINAL_SINGLE_EVENT_SHARE: f64 = 0.4;
/// Zipf exponent of how often each topic is among a user's topics.
pub const TOPIC_ZIPF: f64 = 0.8;
const PARAMS_STREAM: u64 = 2;
const EVENTS_STREAM: u64 = 3;
const SESSION_GAP_SECS: i64 = 1800;
const DAY_SECS: i64 = 86_400;

impl FamilyParams {
    /// Parameters drawn from `seed`; the same seed gives the same world for every pattern.
    pub fn draw(pattern: Pattern, seed: u64) -> Self {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        rng.set_stream(PARAMS_STREAM);
        let sessions_lo = rng.gen_range(4..=6);
        let events_lo = rng.gen_range(2..=4);
        let topics = rng.gen_range(5..=14);
        let interests_lo = rng.gen_range(2..=3);
        FamilyParams {
            pattern,
            seed,
            users: rng.gen_range(500..=1000),
            topics,
            items_per_topic: rng.gen_range(20..=50),
            item_zipf: rng.gen_range(0.7..1.2),
            sessions_per_user: (sessions_lo, sessions_lo + rng.gen_range(2..=6)),
            events_per_session: (events_lo, events_lo + rng.gen_range(3..=8)),
            session_noise: rng.gen_range(0.03..0.12),
            event_noise: rng.gen_range(0.0..0.08),
            interests: (interests_lo, interests_lo + rng.gen_range(0..=2)),
            median_break_hours: rng.gen_range(6.0..36.0),
            break_log_sigma: rng.gen_range(0.8..1.3),
            absence_secs: rng.gen_range(3..=7) * DAY_SECS,
            absence_share: rng.gen_range(0.3..0.5),
            drift: rng.gen_range(0.1..0.25),
            period: if rng.gen_bool(0.5) { Period::Day } else { Period::Week },
            purchase: rng.gen_range(0.3..0.6),
            session_gap_secs: SESSION_GAP_SECS,
        }
    }

    pub fn items(&self) -> usize {
        self.topics * self.items_per_topic
    }

    /// The topic of item number `item` (see the module documentation).
    pub fn topic_of(&self, item: usize) -> usize {
        item % self.topics
    }

    /// The clock band of a moment: true in the day band (see [`Period`]).
    pub fn in_day_band(&self, timestamp: i64) -> bool {
        match self.period {
            Period::Day => (8..20).contains(&(timestamp.rem_euclid(DAY_SECS) / 3600)),
            // 1970-01-01 was a Thursday: day 0 is weekday 3 counted from Monday.
            Period::Week => (timestamp.div_euclid(DAY_SECS) + 3).rem_euclid(7) < 5,
        }
    }
}

/// A generated log and the one piece of hidden truth an oracle may read: which mechanism each
/// user follows (all the same except in a mixture).
#[derive(Debug, Clone, PartialEq)]
pub struct FamilyLog {
    pub params: FamilyParams,
    /// Grouped by user (`u0`, `u1`, …), strictly increasing in time within a user.
    pub events: Vec<Event>,
    pub mechanisms: Vec<Pattern>,
}

/// The log of `params`; deterministic.
pub fn generate(params: &FamilyParams) -> FamilyLog {
    let world = World::new(params);
    let mut rng = ChaCha8Rng::seed_from_u64(params.seed);
    rng.set_stream(EVENTS_STREAM);
    let mut events = Vec::new();
    let mut mechanisms = Vec::with_capacity(params.users);
    for user in 0..params.users {
        let mechanism = match params.pattern {
            Pattern::Mixture => Pattern::MECHANISMS[rng.gen_range(0..Pattern::MECHANISMS.len())],
            single => single,
        };
        mechanisms.push(mechanism);
        world.user(&mut rng, user, mechanism, &mut events);
    }
    FamilyLog {
        params: params.clone(),
        events,
        mechanisms,
    }
}

/// The control copy: the same events in the same order, each user's timestamps replaced by
/// 1 s steps from their first, so no gap reveals a session, an absence or the clock.
pub fn flatten_time(events: &[Event]) -> Vec<Event> {
    let mut out = Vec::with_capacity(events.len());
    for user in events.chunk_by(|a, b| a.user_id == b.user_id) {
        let first = user[0].timestamp;
        out.extend(user.iter().enumerate().map(|(i, e)| Event {
            timestamp: first + i as i64,
            ..e.clone()
        }));
    }
    out
}

/// Sampling tables fixed before users are simulated.
struct World<'a> {
    params: &'a FamilyParams,
    /// Cumulative Zipf weights of a topic's items by popularity rank (the same for every topic).
    item_ranks: Vec<f64>,
    topic_weights: Vec<f64>,
}

/// One session to emit.
struct SessionPlan {
    topic: usize,
    /// Position of the purchase, if the session has one.
    purchase_at: Option<usize>,
}

impl<'a> World<'a> {
    fn new(params: &'a FamilyParams) -> Self {
        World {
            params,
            item_ranks: cumulative_zipf(params.items_per_topic, params.item_zipf),
            topic_weights: cumulative_zipf(params.topics, TOPIC_ZIPF),
        }
    }

    fn item(&self, topic: usize, rng: &mut impl Rng) -> usize {
        topic + draw(&self.item_ranks, rng) * self.params.topics
    }

    fn random_topic(&self, rng: &mut impl Rng) -> usize {
        rng.gen_range(0..self.params.topics)
    }

    /// `count` distinct topics drawn by topic popularity.
    fn user_topics(&self, rng: &mut impl Rng, count: usize) -> Vec<usize> {
        let count = count.min(self.params.topics);
        let mut topics = Vec::with_capacity(count);
        while topics.len() < count {
            let topic = draw(&self.topic_weights, rng);
            if !topics.contains(&topic) {
                topics.push(topic);
            }
        }
        topics
    }

    fn lognormal_break(&self, rng: &mut impl Rng) -> i64 {
        let p = self.params;
        let log_secs = (p.median_break_hours * 3600.0).ln() + p.break_log_sigma * standard_normal(rng);
        p.session_gap_secs + 1 + (log_secs.exp() as i64).min(90 * DAY_SECS)
    }

    /// return's breaks: an absence (at least `absence_secs`, up to 4×) or a short break (up to
    /// a third of it), log-uniform, so the rule's threshold separates them cleanly.
    fn return_break(&self, rng: &mut impl Rng) -> i64 {
        let p = self.params;
        let (lo, hi) = if rng.gen_bool(p.absence_share) {
            (p.absence_secs as f64, 4.0 * p.absence_secs as f64)
        } else {
            ((p.session_gap_secs + 1) as f64, p.absence_secs as f64 / 3.0)
        };
        (lo * (hi / lo).powf(rng.gen::<f64>())) as i64
    }

    fn user(&self, rng: &mut impl Rng, user: usize, mechanism: Pattern, out: &mut Vec<Event>) {
        let p = self.params;
        let user_id = format!("u{user}");
        let interests = rng.gen_range(p.interests.0..=p.interests.1);
        let topics = self.user_topics(rng, interests);
        let sessions = rng.gen_range(p.sessions_per_user.0..=p.sessions_per_user.1);
        let mut now = FIRST_TIMESTAMP + rng.gen_range(0..START_SPREAD_SECS);
        // The state each rule carries from one session to the next.
        let offset = rng.gen_range(0..topics.len());
        let mut open_intent = topics[rng.gen_range(0..topics.len())];
        let mut last_topic = topics[0];
        let mut last_purchased = false;
        for session in 0..sessions {
            let mut absence = false;
            if session > 0 {
                let pause = match mechanism {
                    Pattern::Return => self.return_break(rng),
                    _ => self.lognormal_break(rng),
                };
                absence = pause >= p.absence_secs;
                now += pause;
            }
            let ruled = match mechanism {
                Pattern::Rotation => topics[(offset + session) % topics.len()],
                Pattern::Return if session == 0 || absence => topics[0],
                Pattern::Return => last_topic,
                // A periodic user's first two topics: day band, then the rest of the clock.
                Pattern::Periodic => topics[usize::from(!p.in_day_band(now)) % topics.len()],
                Pattern::Funnel => {
                    if last_purchased {
                        open_intent = other_topic(&topics, open_intent, rng);
                    }
                    open_intent
                }
                Pattern::Mixture => unreachable!("a mixture user follows one mechanism"),
            };
            let topic = if rng.gen_bool(p.session_noise) {
                self.random_topic(rng)
            } else {
                ruled
            };
            let mut length = rng.gen_range(p.events_per_session.0..=p.events_per_session.1);
            if session + 1 == sessions {
                length = if rng.gen_bool(FINAL_SINGLE_EVENT_SHARE) {
                    1
                } else {
                    rng.gen_range(1..=length)
                };
            }
            let purchase_at =
                (mechanism == Pattern::Funnel && rng.gen_bool(p.purchase)).then(|| rng.gen_range(0..length));
            last_purchased = purchase_at.is_some();
            let plan = SessionPlan { topic, purchase_at };
            (now, last_topic) = self.session(rng, &user_id, &plan, (now, length), mechanism == Pattern::Return, out);
        }
    }

    /// Appends one session; returns the time of its last event and the topic it ended on.
    fn session(
        &self,
        rng: &mut impl Rng,
        user_id: &str,
        plan: &SessionPlan,
        (start, length): (i64, usize),
        drifts: bool,
        out: &mut Vec<Event>,
    ) -> (i64, usize) {
        let p = self.params;
        let (mut now, mut topic) = (start, plan.topic);
        for k in 0..length {
            if k > 0 {
                now += click_gap(rng, p.session_gap_secs);
                if drifts && rng.gen_bool(p.drift) {
                    topic = (topic + rng.gen_range(1..p.topics)) % p.topics;
                }
            }
            let shown = if rng.gen_bool(p.event_noise) {
                self.random_topic(rng)
            } else {
                topic
            };
            let event_type = match plan.purchase_at {
                Some(at) if at == k => "purchase",
                // Only the funnel's purchases close intents: elsewhere a session never buys.
                _ => match funnel_step(rng) {
                    "purchase" => "cart",
                    step => step,
                },
            };
            out.push(Event {
                user_id: user_id.to_owned(),
                item_id: format!("i{}", self.item(shown, rng)),
                timestamp: now,
                event_type: Some(event_type.to_owned()),
            });
        }
        (now, topic)
    }
}

/// One of `topics` other than `current`, uniformly; `current` when it is the only one.
fn other_topic(topics: &[usize], current: usize, rng: &mut impl Rng) -> usize {
    let others: Vec<usize> = topics.iter().copied().filter(|&t| t != current).collect();
    if others.is_empty() {
        current
    } else {
        others[rng.gen_range(0..others.len())]
    }
}

#[cfg(test)]
mod tests;
