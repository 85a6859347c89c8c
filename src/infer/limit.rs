//! How many requests may be inside the engine (queued or being computed) at once, adapted to the
//! queue delay the worker sees, in the spirit of CoDel: a queue that never drains below `target`
//! for a whole `interval` is a standing queue, which only adds latency, so the limit shrinks;
//! while the delay stays under `target` and the limit is what turned requests away, it grows.
//! Requests past the limit are refused at once (429), so under overload the admitted ones keep
//! their latency and the worker keeps full batches, instead of every request waiting out a queue
//! that grows until deadlines pass.
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

#[derive(Debug, Clone)]
pub struct LimitConfig {
    /// Queue delay above which a queue counts as standing. Zero turns adaptation off: the limit
    /// stays at `max`.
    pub target: Duration,
    pub interval: Duration,
    /// Never below this (a full batch, so that batching survives the cuts).
    pub min: usize,
    pub max: usize,
}

/// On a standing queue the limit shrinks by target/delay (the share of the queue that would
/// have been fine), at least by a fifth and at most to a quarter; it regrows by a twentieth.
/// Cuts are quick because every interval over target is latency every admitted request pays;
/// growth is cautious because it is only a guess that more would fit.
const DECREASE: (f64, f64) = (0.25, 0.8);
const INCREASE: f64 = 1.05;

pub struct AdaptiveLimit {
    config: LimitConfig,
    limit: AtomicUsize,
    in_flight: AtomicUsize,
    window: Mutex<Window>,
}

struct Window {
    started: Instant,
    /// The smallest queue delay of the interval so far.
    min_delay: Option<Duration>,
    /// Whether the limit turned a request away in this interval.
    refused: bool,
}

/// A place inside the engine; given back on drop.
pub struct Admitted(Arc<AdaptiveLimit>);

impl Drop for Admitted {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

impl AdaptiveLimit {
    pub fn new(config: LimitConfig) -> Arc<Self> {
        let max = config.max.max(1);
        let config = LimitConfig {
            min: config.min.clamp(1, max),
            max,
            ..config
        };
        Arc::new(Self {
            limit: AtomicUsize::new(max),
            in_flight: AtomicUsize::new(0),
            window: Mutex::new(Window {
                started: Instant::now(),
                min_delay: None,
                refused: false,
            }),
            config,
        })
    }

    pub fn limit(&self) -> usize {
        self.limit.load(Ordering::Acquire)
    }

    /// A place, or `None` when the engine already holds as many requests as the limit allows.
    pub fn try_enter(self: &Arc<Self>) -> Option<Admitted> {
        let limit = self.limit();
        let before = self.in_flight.fetch_add(1, Ordering::AcqRel);
        if before < limit {
            return Some(Admitted(self.clone()));
        }
        self.in_flight.fetch_sub(1, Ordering::AcqRel);
        self.note_refusal();
        None
    }

    /// Whether a request arriving now would find a place (a refusal counts as one): lets a front
    /// end turn work away before it spends anything on it.
    pub fn has_room(&self) -> bool {
        let room = self.in_flight.load(Ordering::Acquire) < self.limit();
        if !room {
            self.note_refusal();
        }
        room
    }

    fn note_refusal(&self) {
        self.window.lock().unwrap_or_else(|e| e.into_inner()).refused = true;
    }

    /// Reports the queue delay of the youngest request of a batch that just started (the least
    /// any request of it waited), and at the end of each interval adapts the limit.
    pub fn observe(&self, youngest_delay: Duration, now: Instant) {
        if self.config.target.is_zero() {
            return;
        }
        let mut window = self.window.lock().unwrap_or_else(|e| e.into_inner());
        window.min_delay = Some(window.min_delay.map_or(youngest_delay, |d| d.min(youngest_delay)));
        if now.duration_since(window.started) < self.config.interval {
            return;
        }
        let limit = self.limit() as f64;
        let next = match window.min_delay {
            Some(delay) if delay > self.config.target => {
                let factor = self.config.target.as_secs_f64() / delay.as_secs_f64();
                (limit * factor.clamp(DECREASE.0, DECREASE.1)).floor()
            }
            _ if window.refused => (limit * INCREASE).ceil().max(limit + 1.0),
            _ => limit,
        };
        self.limit.store(
            (next as usize).clamp(self.config.min, self.config.max),
            Ordering::Release,
        );
        *window = Window {
            started: now,
            min_delay: None,
            refused: false,
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limit(target_ms: u64) -> Arc<AdaptiveLimit> {
        AdaptiveLimit::new(LimitConfig {
            target: Duration::from_millis(target_ms),
            interval: Duration::from_millis(100),
            min: 10,
            max: 100,
        })
    }

    /// One interval in which every batch's youngest request waited `delay_ms`.
    fn interval(limit: &AdaptiveLimit, start: Instant, n: u32, delay_ms: u64) -> Instant {
        let end = start + Duration::from_millis(100) * n;
        limit.observe(Duration::from_millis(delay_ms), end - Duration::from_millis(50));
        limit.observe(Duration::from_millis(delay_ms), end);
        end
    }

    #[test]
    fn places_are_counted_and_given_back() {
        let limit = limit(5);
        let held: Vec<_> = (0..100).map(|_| limit.try_enter().expect("under the limit")).collect();
        assert!(!limit.has_room());
        assert!(limit.try_enter().is_none(), "the 101st is refused");
        drop(held);
        assert!(limit.has_room());
        assert!(limit.try_enter().is_some());
    }

    #[test]
    fn a_standing_queue_shrinks_the_limit_down_to_the_floor() {
        let limit = limit(5);
        let start = Instant::now();
        interval(&limit, start, 1, 6);
        assert_eq!(limit.limit(), 80);
        interval(&limit, start, 2, 6);
        assert_eq!(limit.limit(), 64);
        interval(&limit, start, 3, 50);
        assert_eq!(limit.limit(), 16, "ten times the target: cut to a quarter");
        for n in 4..40 {
            interval(&limit, start, n, 50);
        }
        assert_eq!(limit.limit(), 10, "never below one batch");
    }

    #[test]
    fn one_short_wait_in_an_interval_means_no_standing_queue() {
        let limit = limit(5);
        let start = Instant::now();
        limit.observe(Duration::from_millis(40), start + Duration::from_millis(30));
        limit.observe(Duration::from_millis(1), start + Duration::from_millis(60));
        limit.observe(Duration::from_millis(40), start + Duration::from_millis(100));
        assert_eq!(limit.limit(), 100);
    }

    #[test]
    fn grows_back_only_when_it_was_what_refused_requests() {
        let limit = limit(5);
        let start = Instant::now();
        let mut at = start;
        for n in 1..=5 {
            at = interval(&limit, start, n, 6);
        }
        let shrunk = limit.limit();
        assert_eq!(shrunk, 32); // 100 → 80 → 64 → 51 → 40 → 32
        interval(&limit, at, 1, 1);
        assert_eq!(limit.limit(), shrunk, "nobody was refused: no reason to grow");
        let held: Vec<_> = (0..shrunk).map(|_| limit.try_enter().unwrap()).collect();
        assert!(limit.try_enter().is_none());
        drop(held);
        interval(&limit, at, 2, 1);
        assert_eq!(limit.limit(), 34); // ceil(32 × 1.05)
    }

    #[test]
    fn a_zero_target_keeps_the_static_limit() {
        let limit = limit(0);
        let start = Instant::now();
        for n in 1..10 {
            interval(&limit, start, n, 1000);
        }
        assert_eq!(limit.limit(), 100);
    }
}
