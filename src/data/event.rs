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

/// Now, in the unit of event timestamps (Unix seconds).
pub fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}
