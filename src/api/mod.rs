//! The HTTP API: a thin axum adapter over the core ([`Recommender`]): router, admission and
//! metrics layers, JSON decoding, and the mapping of every failure to a JSON error with a status.
pub mod error;
mod handlers;
pub mod openapi;

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::{DefaultBodyLimit, FromRequest, MatchedPath, Request, State};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::de::DeserializeOwned;

use crate::recommend::error::quote;
use crate::recommend::request_id::{accept_or_generate, log_failure, Failure};
use crate::recommend::{CoreError, Operation, Recommender};
use axum::http::HeaderValue;
pub use error::{ApiError, FailureReason};
use tower_http::catch_panic::CatchPanicLayer;
use tower_http::compression::predicate::{DefaultPredicate, Predicate, SizeAbove};
use tower_http::compression::CompressionLayer;
use tower_http::cors::{AllowOrigin, CorsLayer};
use utoipa_swagger_ui::SwaggerUi;

/// Routes under `/v1` (and the admin one) pass admission control; health, metrics and the spec
/// never wait.
pub const V1_ROUTES: [&str; 8] = [
    "/v1/events",
    "/v1/recommend",
    "/v1/recommend/batch",
    "/v1/interests",
    "/v1/users/{id}/history",
    "/v1/users/{id}",
    "/v1/model",
    "/admin/v1/model",
];
pub const OPS_ROUTES: [&str; 4] = ["/health/live", "/health/ready", "/metrics", "/openapi.json"];
/// Where a browser reads the spec (Swagger UI, served from the binary); open like the spec.
pub const DOCS_UI: &str = "/docs";

/// How the API's HTTP side behaves beyond the core's limits.
#[derive(Debug, Clone)]
pub struct HttpOptions {
    /// How long a client may take to send a body (408 `body_timeout` after).
    pub body_read_timeout: Duration,
    /// `false` leaves `/metrics` to [`admin_router`] on its own listener.
    pub with_metrics: bool,
    /// Origins browsers may call the API from (`*` for any); none turns CORS off.
    pub cors_allow_origins: Vec<HeaderValue>,
}

/// Answers at least this large are gzipped for clients that accept it; smaller ones gain less
/// than the work costs.
const COMPRESS_ABOVE_BYTES: u16 = 1024;

/// The API.
pub fn router(state: Arc<Recommender>, options: &HttpOptions) -> Router {
    // Every route's request counter exists before any traffic, so dashboards see zeros.
    for route in V1_ROUTES.iter().chain(&OPS_ROUTES) {
        state.metrics.requests.with_label_values(&[route, "200"]);
    }
    for code in ApiError::all_codes() {
        state
            .metrics
            .request_failures
            .with_label_values(&["/v1/recommend", code]);
    }
    let v1 = Router::new()
        .route("/v1/events", post(handlers::ingest))
        .route("/v1/recommend", post(handlers::recommend))
        .route("/v1/recommend/batch", post(handlers::recommend_batch))
        .route("/v1/interests", post(handlers::interests))
        .route("/v1/users/{id}/history", get(handlers::history))
        .route("/v1/users/{id}", axum::routing::delete(handlers::forget))
        .route("/v1/model", get(handlers::model))
        .route("/admin/v1/model", post(handlers::reload))
        .route_layer(middleware::from_fn_with_state(
            (state.clone(), options.body_read_timeout),
            admit,
        ));
    let mut ops = Router::new()
        .route("/health/live", get(handlers::live))
        .route("/health/ready", get(handlers::ready))
        .route("/openapi.json", get(handlers::openapi))
        .merge(SwaggerUi::new(DOCS_UI).config(utoipa_swagger_ui::Config::from("/openapi.json")));
    if options.with_metrics {
        ops = ops.route("/metrics", get(handlers::metrics));
    }
    // A backstop past the core's own deadline: the body's time, then the request's.
    let answer_within = options.body_read_timeout + state.limits.request_timeout + ANSWER_MARGIN;
    let compression = DefaultPredicate::new().and(SizeAbove::new(COMPRESS_ABOVE_BYTES));
    let mut app = Router::new()
        .merge(v1)
        .merge(ops)
        // Every answer the server gives is the API's JSON error shape, wrong routes included.
        .fallback(handlers::route_not_found)
        .method_not_allowed_fallback(handlers::method_not_allowed)
        .layer(DefaultBodyLimit::max(state.limits.max_body_bytes))
        .layer(CatchPanicLayer::custom(panicked))
        .layer(CompressionLayer::new().gzip(true).compress_when(compression));
    if let Some(cors) = cors(&options.cors_allow_origins) {
        // Outside admission: a browser's preflight carries no API key.
        app = app.layer(cors);
    }
    app.layer(middleware::from_fn_with_state((state.clone(), answer_within), observe))
        .with_state(state)
}

/// How much longer than the body's and the request's own limits any answer may take before
/// the backstop answers 504 `deadline_exceeded` (a stalled store, say).
const ANSWER_MARGIN: Duration = Duration::from_secs(1);

fn cors(origins: &[HeaderValue]) -> Option<CorsLayer> {
    use axum::http::{header, Method};
    if origins.is_empty() {
        return None;
    }
    let allowed = match origins.iter().any(|origin| origin == "*") {
        true => AllowOrigin::any(),
        false => AllowOrigin::list(origins.iter().cloned()),
    };
    Some(
        CorsLayer::new()
            .allow_origin(allowed)
            .allow_methods([Method::GET, Method::POST, Method::DELETE])
            .allow_headers([
                header::CONTENT_TYPE,
                header::AUTHORIZATION,
                header::HeaderName::from_static(REQUEST_ID_HEADER),
            ])
            .expose_headers([header::HeaderName::from_static(REQUEST_ID_HEADER), header::RETRY_AFTER])
            .max_age(Duration::from_secs(600)),
    )
}

/// What `--admin-addr` serves: metrics and health, for a port that only operators reach.
pub fn admin_router(state: Arc<Recommender>) -> Router {
    Router::new()
        .route("/metrics", get(handlers::metrics))
        .route("/health/live", get(handlers::live))
        .route("/health/ready", get(handlers::ready))
        .fallback(handlers::route_not_found)
        .method_not_allowed_fallback(handlers::method_not_allowed)
        .with_state(state)
}

/// The whole body first, within `body_read_timeout`, then admission (the core's decision:
/// readiness, then a permit), so a client that trickles its body holds a connection but never a
/// permit that real requests need. Refusals are 429 or 503 at once.
async fn admit(
    State((core, body_read_timeout)): State<(Arc<Recommender>, Duration)>,
    request: Request,
    next: Next,
) -> Response {
    let (parts, body) = request.into_parts();
    let limit = core.limits.max_body_bytes;
    let body = match tokio::time::timeout(body_read_timeout, axum::body::to_bytes(body, limit)).await {
        Ok(Ok(bytes)) => bytes,
        Ok(Err(error)) => {
            let too_large =
                std::error::Error::source(&error).is_some_and(|source| source.is::<http_body_util::LengthLimitError>());
            let refused = match too_large {
                true => ApiError::PayloadTooLarge,
                false => ApiError::MalformedJson(format!("reading the request body failed: {error}")),
            };
            return refused.into_response();
        }
        Err(_) => return ApiError::BodyTimeout(body_read_timeout.as_millis() as u64).into_response(),
    };
    let route = parts.extensions.get::<MatchedPath>().map(MatchedPath::as_str);
    // This layer wraps the V1_ROUTES only; `/v1/model` is the one left.
    let operation = match route {
        Some("/v1/events") => Operation::Ingest,
        Some("/v1/recommend") => Operation::Recommend,
        Some("/v1/recommend/batch") => Operation::RecommendBatch,
        Some("/v1/interests") => Operation::Interests,
        Some("/v1/users/{id}/history") => Operation::History,
        Some("/v1/users/{id}") => Operation::Forget,
        Some("/admin/v1/model") => Operation::ReloadModel,
        _ => Operation::ModelInfo,
    };
    let authorization = parts
        .headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|value| value.to_str().ok());
    match core.admit(operation, authorization) {
        Ok(_permit) => next.run(Request::from_parts(parts, axum::body::Body::from(body))).await,
        Err(refused) => ApiError::from(refused).into_response(),
    }
}

tokio::task_local! {
    /// The id of the request being handled: error bodies carry it.
    pub static REQUEST_ID: Arc<str>;
}

/// Gives every request an id (its `x-request-id` when sensible, else a new one), echoes it in
/// the response, counts it in the metrics by route (`unmatched` for wrong paths) and status, and
/// writes the one log line of a request that failed or was shed. Outermost, so that it sees
/// every answer, wrong routes and panics included. Answers 504 `deadline_exceeded` for a request
/// still unanswered after `answer_within` (except a model reload, which takes what loading a
/// model takes); tower-http's timeout layer would answer with an empty body.
async fn observe(
    State((state, answer_within)): State<(Arc<Recommender>, Duration)>,
    request: Request,
    next: Next,
) -> Response {
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map_or("unmatched", |p| p.as_str())
        .to_owned();
    let offered = request.headers().get(REQUEST_ID_HEADER).and_then(|v| v.to_str().ok());
    let id: Arc<str> = accept_or_generate(offered).into();
    // Cheap clones (shared bytes); formatted only for a failure's log line.
    let (method, uri) = (request.method().clone(), request.uri().clone());
    let started = Instant::now();
    let unbounded = route == "/admin/v1/model";
    let answer = async {
        match oversized(&request) {
            Some(refused) => refused.into_response(),
            None if unbounded => next.run(request).await,
            None => match tokio::time::timeout(answer_within, next.run(request)).await {
                Ok(response) => response,
                Err(_) => ApiError::from(CoreError::DeadlineExceeded(answer_within.as_millis() as u64)).into_response(),
            },
        }
    };
    let mut response = REQUEST_ID.scope(id.clone(), answer).await;
    let metrics = &state.metrics;
    metrics
        .request_duration
        .with_label_values(&[&route])
        .observe(started.elapsed().as_secs_f64());
    metrics
        .requests
        .with_label_values(&[&route, response.status().as_str()])
        .inc();
    if let Some(failure) = response.extensions().get::<FailureReason>() {
        metrics
            .request_failures
            .with_label_values(&[route.as_str(), failure.code])
            .inc();
        let failure = Failure {
            code: failure.code,
            message: &failure.message,
            server_fault: failure.server_fault,
        };
        let operation = format!("{method} {}", quote(uri.path()));
        log_failure(&id, &operation, response.status().as_str(), &failure, started.elapsed());
    }
    let echoed = HeaderValue::from_str(&id).expect("request ids are tokens");
    response.headers_mut().insert(REQUEST_ID_HEADER, echoed);
    response
}

const REQUEST_ID_HEADER: &str = "x-request-id";

/// Longest request target (path and query) and most header bytes answered; beyond them a
/// request is refused with the JSON 414 or 431. (hyper refuses, without a body, targets of 64 KiB
/// and more, more than 100 headers, and heads beyond its 400 KB buffer.)
pub const MAX_URI_BYTES: usize = 8 * 1024;
pub const MAX_HEADER_BYTES: usize = 32 * 1024;

fn oversized(request: &Request) -> Option<ApiError> {
    let uri = request.uri();
    let target = uri.path().len() + uri.query().map_or(0, |q| q.len() + 1);
    if target > MAX_URI_BYTES {
        return Some(ApiError::UriTooLong(target));
    }
    let headers: usize = request
        .headers()
        .iter()
        .map(|(name, value)| name.as_str().len() + value.len())
        .sum();
    (headers > MAX_HEADER_BYTES).then_some(ApiError::HeadersTooLarge(headers))
}

/// A panicking handler's answer: the JSON 500 (the panic is logged with the request's id).
fn panicked(panic: Box<dyn std::any::Any + Send + 'static>) -> Response {
    let text = panic
        .downcast_ref::<String>()
        .map(String::as_str)
        .or_else(|| panic.downcast_ref::<&str>().copied())
        .unwrap_or("a handler panicked");
    ApiError::Internal(text.to_owned()).into_response()
}

/// `Path<T>` whose rejections (a path segment that is not UTF-8, say) are [`ApiError`]s.
pub struct ApiPath<T>(pub T);

impl<T: DeserializeOwned + Send, S: Send + Sync> axum::extract::FromRequestParts<S> for ApiPath<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut axum::http::request::Parts, state: &S) -> Result<Self, Self::Rejection> {
        match axum::extract::Path::<T>::from_request_parts(parts, state).await {
            Ok(axum::extract::Path(value)) => Ok(Self(value)),
            Err(rejection) => Err(ApiError::MalformedPath(rejection.body_text())),
        }
    }
}

/// `Json<T>` whose rejections are [`ApiError`]s, so malformed bodies get the API's error shape.
pub struct ApiJson<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequest<S> for ApiJson<T> {
    type Rejection = ApiError;

    async fn from_request(request: Request, state: &S) -> Result<Self, Self::Rejection> {
        use axum::extract::rejection::JsonRejection;
        match Json::<T>::from_request(request, state).await {
            Ok(Json(value)) => Ok(Self(value)),
            Err(JsonRejection::JsonDataError(e)) => Err(CoreError::InvalidRequest(quote(&e.body_text())).into()),
            Err(JsonRejection::MissingJsonContentType(e)) => Err(ApiError::UnsupportedMediaType(e.body_text())),
            Err(e) if e.status() == axum::http::StatusCode::PAYLOAD_TOO_LARGE => Err(ApiError::PayloadTooLarge),
            Err(e) => Err(ApiError::MalformedJson(e.body_text())),
        }
    }
}
