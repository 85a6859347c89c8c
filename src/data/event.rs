//! The event: the one record every loader produces and every consumer reads.

/// One user action. External ids stay strings; dense model indices are assigned by [`super::vocab`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    pub user_id: String,
    pub item_id: String,
    /// Seconds since the Unix epoch. Fractional seconds in the source are truncated.
    pub timestamp: i64,
    /// e.g. "view", "click", "cart", "purchase"; `None` when the source has no types.
    pub event_type: Option<String>,
}

/// Latest timestamp an event (or a moment of prediction) may carry: 9999-12-31T23:59:59Z. Bounds
/// keep time arithmetic far from overflow and refuse values that can only be mistakes: a count of
/// milliseconds since early 1978 is past it, so a log or a client counting milliseconds is told so
/// instead of training or serving on sessions a thousand times too short.
pub const MAX_TIMESTAMP: i64 = 253_402_300_799;

/// Whether a count too large for [`MAX_TIMESTAMP`] in seconds would be in range as milliseconds
/// (truncated to the second, as a millisecond log is read): then its sender is told so.
pub fn in_range_as_milliseconds(count: f64) -> bool {
    (count / 1000.0).trunc() <= MAX_TIMESTAMP as f64
}

/// Now, in the unit of event timestamps (Unix seconds).
pub fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}
