//! Request and response bodies that every front end shares; their JSON shapes are the REST
//! API's, and their schemas in `docs/openapi.json` are derived from these definitions.
use serde::{Deserialize, Serialize};
use utoipa::openapi::{KnownFormat, ObjectBuilder, RefOr, Schema, SchemaFormat, Type};
use utoipa::{PartialSchema, ToSchema};

use super::{MAX_ID_CHARS, MAX_PATH_CHARS, MAX_TIMESTAMP};

/// What the core accepts as a user, item or event-type id, as a regular expression (ECMA-262
/// and Python alike): no control character (Unicode `Cc`), and at least one character that is
/// neither control nor Unicode white space.
pub const ID_PATTERN: &str = r"^[^\u0000-\u001F\u007F-\u009F]*[^\u0000-\u0020\u007F-\u00A0\u1680\u2000-\u200A\u2028\u2029\u202F\u205F\u3000][^\u0000-\u001F\u007F-\u009F]*$";

/// A string the core checks as it checks ids, up to `max_chars` characters.
fn id_like(max_chars: usize, description: &str) -> RefOr<Schema> {
    ObjectBuilder::new()
        .schema_type(Type::String)
        .min_length(Some(1))
        .max_length(Some(max_chars))
        .pattern(Some(ID_PATTERN))
        .description(Some(description))
        .into()
}

/// The schema of an id (for the OpenAPI document): exactly the core's rule.
pub struct Id;

impl PartialSchema for Id {
    fn schema() -> RefOr<Schema> {
        id_like(
            MAX_ID_CHARS,
            "A user, item or event-type id: not blank, no control characters.",
        )
    }
}

impl ToSchema for Id {}

/// The schema of a reload's model directory.
pub struct ModelDir;

impl PartialSchema for ModelDir {
    fn schema() -> RefOr<Schema> {
        id_like(MAX_PATH_CHARS, "A model directory on the server's machine.")
    }
}

impl ToSchema for ModelDir {}

/// The schema of a moment (for the OpenAPI document): Unix seconds the core accepts.
pub struct UnixSeconds;

impl PartialSchema for UnixSeconds {
    fn schema() -> RefOr<Schema> {
        ObjectBuilder::new()
            .schema_type(Type::Integer)
            .format(Some(SchemaFormat::KnownFormat(KnownFormat::Int64)))
            .minimum(Some(0))
            .maximum(Some(MAX_TIMESTAMP))
            .description(Some("Unix seconds."))
            .into()
    }
}

impl ToSchema for UnixSeconds {}

#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct EventIn {
    #[schema(value_type = Id)]
    pub user_id: String,
    #[schema(value_type = Id)]
    pub item_id: String,
    #[schema(value_type = UnixSeconds)]
    #[serde(deserialize_with = "integer::i64")]
    pub timestamp: i64,
    /// One of the model's event types (e.g. `view`, `cart`, `purchase`); absent: untyped. A type
    /// the model does not know is accepted and counted in `unknown_event_types`: the model reads
    /// the event as untyped, the store keeps the type's name (for `xsrec history export`).
    #[schema(value_type = Option<Id>)]
    pub event_type: Option<String>,
}

#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct EventsRequest {
    /// At most the server's `--max-events-per-call` (1000 by default).
    #[schema(min_items = 1, max_items = 1000)]
    pub events: Vec<EventIn>,
}

/// What an ingest stored.

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, ToSchema)]
pub struct EventsResponse {
    pub accepted: usize,
    /// Accepted events whose item the model does not know (stored, not model input).
    pub unknown_items: usize,
    /// Accepted events whose `event_type` the model does not know (read by the model as
    /// untyped; the store keeps the name).
    pub unknown_event_types: usize,
}

/// Items recommended when a request does not say (REST and gRPC alike).
pub const DEFAULT_K: usize = 10;
/// Categories returned by an interests request that does not say.
pub const DEFAULT_TOP: usize = 5;
/// The most items one recommendation may ask for.
pub const MAX_K: usize = 1000;
/// The most categories one interests request may ask for.
pub const MAX_TOP: usize = 1000;

fn default_k() -> usize {
    DEFAULT_K
}

fn default_true() -> bool {
    true
}

#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RecommendRequest {
    #[schema(value_type = Id)]
    pub user_id: String,
    #[serde(default = "default_k", deserialize_with = "integer::usize")]
    #[schema(default = 10, minimum = 1, maximum = 1000)]
    pub k: usize,
    /// Leave every item the user had out of a full-catalogue ranking, the events older than the
    /// server's `--history-cap` included (until retention or erasure forgets them).
    #[serde(default = "default_true")]
    #[schema(default = true)]
    pub exclude_seen: bool,
    /// Rank only these items (e.g. the ads on offer); at most the server's `--max-candidates`
    /// (10,000 by default).
    #[schema(value_type = Option<Vec<Id>>, min_items = 1, max_items = 10_000)]
    pub candidates: Option<Vec<String>>,
    /// Moment of prediction; default now. The whole stored history is read whatever the moment:
    /// one before the newest event reads as a gap of zero since it (the hour of the week is
    /// still the moment's own), not as a request for the history as it stood then.
    #[schema(value_type = Option<UnixSeconds>)]
    #[serde(default, deserialize_with = "integer::option_i64")]
    pub at: Option<i64>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, ToSchema)]
pub struct ScoredItem {
    pub item_id: String,
    pub score: f32,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, ToSchema)]
pub struct RecommendResponse {
    pub user_id: String,
    /// Best first.
    pub items: Vec<ScoredItem>,
    /// The version of the model that computed the answer.
    pub model_version: String,
    /// `"popular"` when the user had no usable history and popularity answered instead.
    pub fallback: Option<String>,
    /// Candidates the model does not know, left out of the ranking.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub unknown_candidates: Vec<String>,
}

#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct BatchRecommendRequest {
    /// At most the server's `--max-batch-requests` (256 by default).
    #[schema(min_items = 1, max_items = 256)]
    pub requests: Vec<RecommendRequest>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, ToSchema)]
pub struct BatchRecommendResponse {
    pub results: Vec<RecommendResponse>,
}

fn default_top() -> usize {
    DEFAULT_TOP
}

#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct InterestsRequest {
    #[schema(value_type = Id)]
    pub user_id: String,
    /// Categories to return (all of the model's when it has fewer).
    #[serde(default = "default_top", deserialize_with = "integer::usize")]
    #[schema(default = 5, minimum = 1, maximum = 1000)]
    pub top: usize,
    /// Moment of prediction; default now. The whole stored history is read whatever the moment:
    /// one before the newest event reads as a gap of zero since it (the hour of the week is
    /// still the moment's own), not as a request for the history as it stood then.
    #[schema(value_type = Option<UnixSeconds>)]
    #[serde(default, deserialize_with = "integer::option_i64")]
    pub at: Option<i64>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, ToSchema)]
pub struct CategoryScore {
    pub category: String,
    /// Probability that the next item belongs to the category (multi-category items split evenly).
    pub score: f32,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, ToSchema)]
pub struct InterestsResponse {
    pub user_id: String,
    /// Most likely first.
    pub interests: Vec<CategoryScore>,
    pub model_version: String,
    /// `"popular"` when the user had no usable history and popularity answered instead.
    pub fallback: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, ToSchema)]
pub struct HistoryEvent {
    pub item_id: String,
    pub timestamp: i64,
    /// The type as the model reads it: null for untyped events and for types the model does not
    /// know (those keep their name in the store, as `xsrec history export` shows).
    pub event_type: Option<String>,
    /// Whether the model knows the item (unknown items are stored but not model input).
    pub known_item: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, ToSchema)]
pub struct HistoryResponse {
    pub user_id: String,
    /// Oldest first: the events memory serves the model from (the newest `--history-cap`).
    pub events: Vec<HistoryEvent>,
}

/// `POST /admin/v1/model` (an empty body is the same as `{}`).
#[derive(Debug, Clone, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ReloadRequest {
    /// Absent: the served model's directory, read again.
    #[schema(value_type = Option<ModelDir>)]
    pub path: Option<String>,
}

/// The served model (`GET /v1/model`, and the answer to a reload).
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ModelInfo {
    /// A digest of the model's files; every answer names the version that computed it.
    pub version: String,
    /// The artifact's `config.json`: architecture, features, training data and metrics.
    #[schema(value_type = Object)]
    pub config: serde_json::Value,
}

/// JSON has one number type: `55.0` is the integer 55, as JSON Schema's `integer` says, and
/// clients whose numbers pass through floating point (JavaScript, Python's `time.time() // 1`)
/// send it so. A fraction or a value out of range is still refused, by name.
mod integer {
    use std::fmt;

    use serde::de::{self, Deserialize, Deserializer, Visitor};

    struct Integer;

    impl Visitor<'_> for Integer {
        type Value = i128;

        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("an integer")
        }

        fn visit_i64<E>(self, v: i64) -> Result<i128, E> {
            Ok(v.into())
        }

        fn visit_u64<E>(self, v: u64) -> Result<i128, E> {
            Ok(v.into())
        }

        fn visit_f64<E: de::Error>(self, v: f64) -> Result<i128, E> {
            // Beyond 2^63 no float is a useful integer here; every one below it with no
            // fraction is exact.
            match v.fract() == 0.0 && v.abs() < 9.2e18 {
                true => Ok(v as i128),
                false => Err(E::invalid_value(de::Unexpected::Float(v), &self)),
            }
        }
    }

    fn integer<'de, T: TryFrom<i128>, D: Deserializer<'de>>(d: D) -> Result<T, D::Error> {
        let value = d.deserialize_any(Integer)?;
        T::try_from(value).map_err(|_| de::Error::custom(format_args!("{value} is out of range")))
    }

    pub fn i64<'de, D: Deserializer<'de>>(d: D) -> Result<i64, D::Error> {
        integer(d)
    }

    pub fn usize<'de, D: Deserializer<'de>>(d: D) -> Result<usize, D::Error> {
        integer(d)
    }

    pub fn option_i64<'de, D: Deserializer<'de>>(d: D) -> Result<Option<i64>, D::Error> {
        #[derive(serde::Deserialize)]
        struct Present(#[serde(deserialize_with = "i64")] i64);
        Ok(Option::<Present>::deserialize(d)?.map(|Present(value)| value))
    }

    #[cfg(test)]
    mod tests {
        use crate::recommend::types::RecommendRequest;

        #[test]
        fn integral_floats_are_integers_and_fractions_are_refused_by_name() {
            let parse = |text: &str| serde_json::from_str::<RecommendRequest>(text);
            let request = parse(r#"{"user_id": "u", "k": 55.0, "at": 1700000000.0}"#).unwrap();
            assert_eq!((request.k, request.at), (55, Some(1_700_000_000)));
            let request = parse(r#"{"user_id": "u", "k": 3, "at": null}"#).unwrap();
            assert_eq!((request.k, request.at), (3, None));
            assert_eq!(parse(r#"{"user_id": "u"}"#).unwrap().k, super::super::DEFAULT_K);
            for (bad, says) in [
                (r#"{"user_id": "u", "k": 5.5}"#, "5.5"),
                (r#"{"user_id": "u", "k": -1}"#, "-1 is out of range"),
                (r#"{"user_id": "u", "k": 1e300}"#, "1e+300"),
                (r#"{"user_id": "u", "at": "now"}"#, "an integer"),
            ] {
                let error = parse(bad).unwrap_err().to_string();
                assert!(error.contains(says), "{bad}: {error}");
            }
        }
    }
}
