//! The HTTP face of errors: the core's errors plus the few only HTTP can have (a body that is not
//! JSON, too large, or of the wrong type), each with a status and a stable machine code.
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Serialize;
use std::sync::Arc;
use utoipa::ToSchema;

use crate::recommend::error::quote;
use crate::recommend::CoreError;

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ApiError {
    #[error("{}", quote(.0))]
    MalformedJson(String),
    #[error("request body exceeds the server's limit (--max-body-bytes)")]
    PayloadTooLarge,
    #[error("the request body did not arrive within {0} ms (--body-read-timeout-ms)")]
    BodyTimeout(u64),
    #[error("{}", quote(.0))]
    UnsupportedMediaType(String),
    #[error("no route {}; the API is listed at /openapi.json", quote(.0))]
    RouteNotFound(String),
    #[error("{} does not take {}", quote(.0), .1)]
    MethodNotAllowed(String, String),
    #[error("{}", quote(.0))]
    MalformedPath(String),
    #[error("the request target is {0} bytes; at most {max} are accepted", max = super::MAX_URI_BYTES)]
    UriTooLong(usize),
    #[error("the request's headers are {0} bytes; at most {max} are accepted", max = super::MAX_HEADER_BYTES)]
    HeadersTooLarge(usize),
    /// A handler panicked (a bug): the request fails alone, the server goes on.
    #[error("internal error: {}", quote(.0))]
    Internal(String),
    #[error(transparent)]
    Core(#[from] CoreError),
}

impl ApiError {
    pub fn status(&self) -> StatusCode {
        match self {
            Self::MalformedJson(_) => StatusCode::BAD_REQUEST,
            Self::PayloadTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            Self::BodyTimeout(_) => StatusCode::REQUEST_TIMEOUT,
            Self::UnsupportedMediaType(_) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            Self::RouteNotFound(_) => StatusCode::NOT_FOUND,
            Self::MethodNotAllowed(..) => StatusCode::METHOD_NOT_ALLOWED,
            Self::MalformedPath(_) => StatusCode::BAD_REQUEST,
            Self::UriTooLong(_) => StatusCode::URI_TOO_LONG,
            Self::HeadersTooLarge(_) => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            Self::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
            Self::Core(core) => match core {
                CoreError::InvalidRequest(_) | CoreError::CategoriesUnavailable => StatusCode::UNPROCESSABLE_ENTITY,
                CoreError::UserNotFound(_) => StatusCode::NOT_FOUND,
                CoreError::Overloaded => StatusCode::TOO_MANY_REQUESTS,
                CoreError::NotReady(_) | CoreError::ShuttingDown => StatusCode::SERVICE_UNAVAILABLE,
                CoreError::DeadlineExceeded(_) => StatusCode::GATEWAY_TIMEOUT,
                CoreError::InferenceFailed(_) | CoreError::StorageFailed(_) => StatusCode::INTERNAL_SERVER_ERROR,
                CoreError::Unauthenticated(_) => StatusCode::UNAUTHORIZED,
                CoreError::Forbidden(_) => StatusCode::FORBIDDEN,
                CoreError::ModelLoadFailed(_) => StatusCode::UNPROCESSABLE_ENTITY,
                CoreError::ModelIncompatible(_) => StatusCode::CONFLICT,
            },
        }
    }

    /// Stable code for clients and the `reason` label of the failure metric.
    pub fn code(&self) -> &'static str {
        match self {
            Self::MalformedJson(_) => "malformed_json",
            Self::PayloadTooLarge => "payload_too_large",
            Self::BodyTimeout(_) => "body_timeout",
            Self::UnsupportedMediaType(_) => "unsupported_media_type",
            Self::RouteNotFound(_) => "route_not_found",
            Self::MethodNotAllowed(..) => "method_not_allowed",
            Self::MalformedPath(_) => "malformed_path",
            Self::UriTooLong(_) => "uri_too_long",
            Self::HeadersTooLarge(_) => "headers_too_large",
            Self::Internal(_) => "internal_error",
            Self::Core(core) => core.code(),
        }
    }

    /// Every code a response can carry.
    pub fn all_codes() -> impl Iterator<Item = &'static str> {
        [
            "malformed_json",
            "payload_too_large",
            "body_timeout",
            "unsupported_media_type",
            "route_not_found",
            "method_not_allowed",
            "malformed_path",
            "uri_too_long",
            "headers_too_large",
            "internal_error",
        ]
        .into_iter()
        .chain(CoreError::ALL_CODES)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let message = self.to_string();
        let body = ErrorBody {
            error: ErrorDetail {
                code: self.code(),
                message: message.clone(),
                request_id: super::REQUEST_ID.try_with(Arc::clone).ok(),
            },
        };
        let mut response = (self.status(), Json(body)).into_response();
        if matches!(
            self,
            Self::Core(CoreError::Overloaded | CoreError::NotReady(_) | CoreError::ShuttingDown)
        ) {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        if matches!(self, Self::Core(CoreError::Unauthenticated(_))) {
            response
                .headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        // Lets the metrics and log layers see the failure without parsing the body.
        let server_fault = match &self {
            Self::Internal(_) => true,
            Self::Core(core) => core.is_server_fault(),
            _ => false,
        };
        response.extensions_mut().insert(FailureReason {
            code: self.code(),
            message,
            server_fault,
        });
        response
    }
}

/// Every error answer's body.
#[derive(Debug, Serialize, ToSchema)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ErrorDetail {
    /// Stable and machine-readable; the message is for people.
    #[schema(schema_with = code_schema)]
    pub code: &'static str,
    pub message: String,
    /// The request's id: the client's `x-request-id` when it is 1..=128 bytes of letters,
    /// digits and `-_.:/+=`, else a generated UUID; also in the `x-request-id` header of every
    /// response.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<String>)]
    pub request_id: Option<Arc<str>>,
}

/// The `code` field: one of [`ApiError::all_codes`], listed from the code itself.
fn code_schema() -> utoipa::openapi::Object {
    utoipa::openapi::ObjectBuilder::new()
        .schema_type(utoipa::openapi::Type::String)
        .enum_values(Some(ApiError::all_codes()))
        .build()
}

/// Attached to error responses for the request-metrics and log middleware.
#[derive(Debug, Clone)]
pub struct FailureReason {
    pub code: &'static str,
    pub message: String,
    pub server_fault: bool,
}
