//! The API's OpenAPI description, derived from the handlers, the body types and [`ApiError`], so
//! that routes, schemas and error statuses cannot drift from what the server does.
//! `docs/openapi.json` is this document, written by `xsrec openapi` (a test checks it is current).
use std::collections::BTreeMap;

use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::openapi::{ContentBuilder, Ref, RefOr, Response, ResponseBuilder};
use utoipa::{IntoResponses, Modify, OpenApi};

use super::error::{ApiError, ErrorBody};
use super::handlers;
use crate::recommend::CoreError;

#[derive(OpenApi)]
#[openapi(
    info(
        title = "xsrec",
        version = "1",
        description = "Cross-session next-item recommendation. Every error answer is an `ErrorBody` \
            (`{\"error\": {\"code\", \"message\", \"request_id\"}}`) whose `code` is stable. Every \
            response carries an `x-request-id` header: the client's own when sensible, else a new \
            UUID. A browsable copy of this document is served at `/docs/`."
    ),
    paths(
        handlers::ingest,
        handlers::recommend,
        handlers::recommend_batch,
        handlers::interests,
        handlers::history,
        handlers::forget,
        handlers::model,
        handlers::reload,
        handlers::live,
        handlers::ready,
        handlers::metrics,
        handlers::openapi,
    ),
    components(schemas(ErrorBody)),
    modifiers(&ApiKeys)
)]
pub struct ApiDoc;

/// The document as served at `/openapi.json` and written to `docs/openapi.json`.
pub fn document() -> String {
    let mut text = ApiDoc::openapi().to_pretty_json().expect("the spec serialises");
    text.push('\n');
    text
}

/// The security scheme the routes under admission name.
struct ApiKeys;

impl Modify for ApiKeys {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            API_KEY_SCHEME,
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .description(Some(
                        "An API key from --api-keys-file or XSREC_API_KEYS. Scopes: `read` \
                         (recommend, interests, history, model), `write` (events, erasure), \
                         `admin` (reload). Without configured keys the server asks for none.",
                    ))
                    .build(),
            ),
        );
    }
}

/// Named by every route that passes admission (`security(("apiKey" = []))` on its handler).
const API_KEY_SCHEME: &str = "apiKey";

/// One response per status among `errors`, naming the codes it carries.
fn error_responses(errors: Vec<ApiError>) -> BTreeMap<String, RefOr<Response>> {
    let mut codes: BTreeMap<u16, Vec<&'static str>> = BTreeMap::new();
    for error in &errors {
        let listed = codes.entry(error.status().as_u16()).or_default();
        if !listed.contains(&error.code()) {
            listed.push(error.code());
        }
    }
    codes
        .into_iter()
        .map(|(status, codes)| {
            let content = ContentBuilder::new()
                .schema(Some(Ref::from_schema_name("ErrorBody")))
                .build();
            let response = ResponseBuilder::new()
                .description(format!("error: `{}`", codes.join("`, `")))
                .content("application/json", content)
                .build();
            (status.to_string(), RefOr::T(response))
        })
        .collect()
}

fn blank() -> String {
    String::new()
}

/// What any request can meet before or around its handler: a request too large to read, the
/// answer backstop, a handler's panic.
fn any_request() -> Vec<ApiError> {
    vec![
        ApiError::UriTooLong(0),
        ApiError::HeadersTooLarge(0),
        ApiError::Core(CoreError::DeadlineExceeded(0)),
        ApiError::Internal(blank()),
    ]
}

/// What admission answers (the `/v1` and admin routes).
fn admission() -> Vec<ApiError> {
    [
        CoreError::Unauthenticated(blank()),
        CoreError::Forbidden("read"),
        CoreError::Overloaded,
        CoreError::NotReady(blank()),
        CoreError::ShuttingDown,
    ]
    .into_iter()
    .map(ApiError::Core)
    .chain(any_request())
    .collect()
}

/// What reading a JSON body can answer, on top of admission's.
fn json_body() -> Vec<ApiError> {
    [
        ApiError::MalformedJson(blank()),
        ApiError::PayloadTooLarge,
        ApiError::BodyTimeout(0),
        ApiError::UnsupportedMediaType(blank()),
        ApiError::Core(CoreError::InvalidRequest(blank())),
    ]
    .into_iter()
    .chain(admission())
    .collect()
}

/// What a route taking a user id in its path can answer, on top of admission's.
fn user_path() -> Vec<ApiError> {
    [
        ApiError::MalformedPath(blank()),
        ApiError::Core(CoreError::InvalidRequest(blank())),
        ApiError::Core(CoreError::UserNotFound(blank())),
    ]
    .into_iter()
    .chain(admission())
    .collect()
}

/// A type per route family whose `responses()` are the errors listed, for `#[utoipa::path]`.
macro_rules! errors {
    ($($(#[$doc:meta])* $name:ident = $errors:expr;)+) => {$(
        $(#[$doc])*
        pub struct $name;

        impl IntoResponses for $name {
            fn responses() -> BTreeMap<String, RefOr<Response>> {
                error_responses($errors)
            }
        }
    )+};
}

errors! {
    IngestErrors = [json_body(), vec![CoreError::StorageFailed(blank()).into()]].concat();
    RecommendErrors = [json_body(), vec![CoreError::InferenceFailed(blank()).into()]].concat();
    InterestsErrors = [
        json_body(),
        vec![CoreError::InferenceFailed(blank()).into(), CoreError::CategoriesUnavailable.into()],
    ]
    .concat();
    HistoryErrors = user_path();
    ForgetErrors = [user_path(), vec![CoreError::StorageFailed(blank()).into()]].concat();
    AdmittedErrors = admission();
    /// The reload reads its optional body itself: no media type, and bad JSON is an invalid request.
    ReloadErrors = [
        admission(),
        vec![
            ApiError::PayloadTooLarge,
            ApiError::BodyTimeout(0),
            CoreError::InvalidRequest(blank()).into(),
            CoreError::ModelLoadFailed(blank()).into(),
            CoreError::ModelIncompatible(blank()).into(),
        ],
    ]
    .concat();
    ReadinessErrors = [any_request(), vec![CoreError::NotReady(blank()).into(), CoreError::ShuttingDown.into()]].concat();
    AnyRequestErrors = any_request();
}
