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
