//! The one error type of the HTTP API: every variant has a status and a stable machine code.
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::json;

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ApiError {
    #[error("{0}")]
    MalformedJson(String),
    #[error("{0}")]
    InvalidRequest(String),
    #[error("request body exceeds the server's limit (--max-body-bytes)")]
    PayloadTooLarge,
    #[error("{0}")]
    UnsupportedMediaType(String),
    #[error("user `{0}` has no history")]
    UserNotFound(String),
    #[error("the model has no item categories; start the server with --item-meta to enable interests")]
    CategoriesUnavailable,
    #[error("too many requests in flight; retry shortly")]
    Overloaded,
    #[error("the model is still loading")]
    NotReady,
    #[error("the request did not finish within its deadline of {0} ms")]
    DeadlineExceeded(u64),
    #[error("the server is shutting down")]
    ShuttingDown,
}

impl ApiError {
    pub fn status(&self) -> StatusCode {
        match self {
            Self::MalformedJson(_) => StatusCode::BAD_REQUEST,
            Self::InvalidRequest(_) => StatusCode::UNPROCESSABLE_ENTITY,
            Self::PayloadTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            Self::UnsupportedMediaType(_) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            Self::UserNotFound(_) => StatusCode::NOT_FOUND,
            Self::CategoriesUnavailable => StatusCode::UNPROCESSABLE_ENTITY,
            Self::Overloaded => StatusCode::TOO_MANY_REQUESTS,
            Self::NotReady | Self::ShuttingDown => StatusCode::SERVICE_UNAVAILABLE,
            Self::DeadlineExceeded(_) => StatusCode::GATEWAY_TIMEOUT,
        }
    }

    /// Stable code for clients and the `reason` label of the failure metric.
    pub fn code(&self) -> &'static str {
        match self {
            Self::MalformedJson(_) => "malformed_json",
            Self::InvalidRequest(_) => "invalid_request",
            Self::PayloadTooLarge => "payload_too_large",
            Self::UnsupportedMediaType(_) => "unsupported_media_type",
            Self::UserNotFound(_) => "user_not_found",
            Self::CategoriesUnavailable => "categories_unavailable",
            Self::Overloaded => "overloaded",
            Self::NotReady => "not_ready",
            Self::DeadlineExceeded(_) => "deadline_exceeded",
            Self::ShuttingDown => "shutting_down",
        }
    }

    pub const ALL_CODES: [&'static str; 10] = [
        "malformed_json",
        "invalid_request",
        "payload_too_large",
        "unsupported_media_type",
        "user_not_found",
        "categories_unavailable",
        "overloaded",
        "not_ready",
        "deadline_exceeded",
        "shutting_down",
    ];
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = json!({"error": {"code": self.code(), "message": self.to_string()}});
        let mut response = (self.status(), Json(body)).into_response();
        if matches!(self, Self::Overloaded | Self::NotReady) {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        // Lets the metrics layer label failures without parsing the body.
        response.extensions_mut().insert(FailureReason(self.code()));
        response
    }
}

/// Attached to error responses for the request-metrics middleware.
#[derive(Debug, Clone, Copy)]
pub struct FailureReason(pub &'static str);
