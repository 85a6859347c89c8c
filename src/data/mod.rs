//! Events in, sequences out: file formats, vocabularies, sessionisation, splits, synthetic logs.
pub mod error;
pub mod event;
pub mod family;
pub mod fetch;
pub mod formats;
pub mod session;
pub mod split;
pub mod synth;
pub mod vocab;

pub use error::DataError;
pub use event::{in_range_as_milliseconds, unix_now, Event, MAX_TIMESTAMP};
