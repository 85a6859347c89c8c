//! Sessionisation, time-gap bucketing and the clock: the one definition used by training,
//! evaluation and serving, so a model sees online exactly the features it saw offline.

/// Default inactivity gap that ends a session: 30 minutes.
pub const DEFAULT_SESSION_GAP_SECS: i64 = 30 * 60;

/// True when an inactivity gap of `gap_secs` ends the previous session.
/// A gap exactly equal to the threshold still continues the session.
pub fn starts_new_session(gap_secs: i64, session_gap_secs: i64) -> bool {
    gap_secs > session_gap_secs
}

/// Session index (0-based, counted from the first event) for chronologically ordered timestamps.
pub fn session_indices(timestamps: &[i64], session_gap_secs: i64) -> Vec<u32> {
    let mut session = 0u32;
    let mut out = Vec::with_capacity(timestamps.len());
    for (i, &ts) in timestamps.iter().enumerate() {
        if i > 0 && starts_new_session(ts - timestamps[i - 1], session_gap_secs) {
            session += 1;
        }
        out.push(session);
    }
    out
}

/// Index 0 is padding and index 1 means "no earlier event"; real gaps start at 2.
pub const GAP_BUCKET_PAD: i64 = 0;
pub const GAP_BUCKET_NONE: i64 = 1;
const LOG2_BUCKETS: i64 = 32;
/// Number of distinct gap-bucket indices (embedding table size).
pub const NUM_GAP_BUCKETS: i64 = 2 + 2 * LOG2_BUCKETS;

/// Log2-bucketed gap, split once more at the session threshold so that the bucket alone tells
/// whether the gap opened a new session (the log2 edges would otherwise straddle 30 minutes).
pub fn gap_bucket(gap_secs: i64, session_gap_secs: i64) -> i64 {
    let gap = gap_secs.max(0) as u64;
    let log2 = (63 - (gap + 1).leading_zeros() as i64).min(LOG2_BUCKETS - 1);
    2 + 2 * log2 + i64::from(starts_new_session(gap_secs, session_gap_secs))
}

pub const HOURS_PER_DAY: i64 = 24;
pub const DAYS_PER_WEEK: i64 = 7;
/// Hour-of-week numbers plus the padding number 0.
pub const NUM_HOUR_SLOTS: i64 = 1 + DAYS_PER_WEEK * HOURS_PER_DAY;

/// The hour of the week of a Unix timestamp in UTC, 1 (Monday 00:00–00:59) to 168, so that 0
/// stays padding. One slot carries both the time of day and the day of the week.
pub fn hour_of_week(timestamp: i64) -> i64 {
    // 1970-01-01 was a Thursday, three days after the Monday the week is counted from.
    1 + (timestamp.div_euclid(3600) + 3 * 24).rem_euclid(7 * 24)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sessions_split_on_gaps_strictly_longer_than_threshold() {
        let ts = [0, 10, 1810, 3611, 3612, 100_000];
        assert_eq!(session_indices(&ts, 1800), vec![0, 0, 0, 1, 1, 2]);
        assert!(session_indices(&[], 1800).is_empty());
    }

    #[test]
    fn equal_timestamps_stay_in_one_session() {
        assert_eq!(session_indices(&[5, 5, 5], 1800), vec![0, 0, 0]);
    }

    #[test]
    fn hours_of_the_week_start_on_monday_in_utc() {
        // 2020-09-14 00:00:00 UTC was a Monday.
        let monday = 1_600_041_600;
        assert_eq!(hour_of_week(monday), 1);
        assert_eq!(hour_of_week(monday + 3599), 1);
        assert_eq!(hour_of_week(monday + 3600), 2);
        assert_eq!(hour_of_week(monday - 1), 168, "Sunday 23:59");
        assert_eq!(hour_of_week(monday + 7 * 86_400 + 13 * 3600), 14);
        assert_eq!(hour_of_week(-1), hour_of_week(7 * 86_400 - 1), "before 1970 too");
        for t in (monday..monday + 14 * 86_400).step_by(1800) {
            assert!((1..NUM_HOUR_SLOTS).contains(&hour_of_week(t)));
        }
    }

    #[test]
    fn gap_buckets_are_log2_and_mark_session_starts() {
        assert_eq!(gap_bucket(0, 1800), 2);
        assert_eq!(gap_bucket(1, 1800), 4);
        assert_eq!(gap_bucket(2, 1800), 4);
        assert_eq!(gap_bucket(3, 1800), 6);
        // 1800 and 1801 share a log2 bucket (10) but differ in the session flag.
        assert_eq!(gap_bucket(1800, 1800), 22);
        assert_eq!(gap_bucket(1801, 1800), 23);
        assert_eq!(gap_bucket(-5, 1800), 2, "clock skew counts as no gap");
        assert!(gap_bucket(i64::MAX, 1800) < NUM_GAP_BUCKETS);
    }
}
