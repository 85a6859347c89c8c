//! The core's one error type: every variant has a stable machine code, which front ends map to
//! their own status (HTTP in `api/error.rs`, gRPC codes later) in one place each.

/// Longest piece of client input quoted back in an error message: a hostile 1 MB field must not
/// come back as a 1 MB error body.
pub const MAX_QUOTED_BYTES: usize = 128;

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum CoreError {
    #[error("{0}")]
    InvalidRequest(String),
    #[error("user `{}` has no history", quote(.0))]
    UserNotFound(String),
    #[error("the model has no item categories; start the server with --item-meta to enable interests")]
    CategoriesUnavailable,
    #[error("too many requests in flight; retry shortly")]
    Overloaded,
    #[error("not ready: {0}")]
    NotReady(String),
    #[error("the request did not finish within its deadline of {0} ms")]
    DeadlineExceeded(u64),
    #[error("the server is shutting down")]
    ShuttingDown,
    #[error("inference failed: {0}")]
    InferenceFailed(String),
    #[error("storing the events failed: {0}")]
    StorageFailed(String),
    #[error("{0}")]
    Unauthenticated(String),
    #[error("this API key lacks the `{0}` scope")]
    Forbidden(&'static str),
    /// A reload's model could not be read; the served model goes on.
    #[error("{0}")]
    ModelLoadFailed(String),
    /// A reload's model cannot serve the histories in memory; the served model goes on.
    #[error("{0}")]
    ModelIncompatible(String),
}

impl CoreError {
    /// Stable code for clients and the `reason` label of the failure metric.
    pub fn code(&self) -> &'static str {
        match self {
            Self::InvalidRequest(_) => "invalid_request",
            Self::UserNotFound(_) => "user_not_found",
            Self::CategoriesUnavailable => "categories_unavailable",
            Self::Overloaded => "overloaded",
            Self::NotReady(_) => "not_ready",
            Self::DeadlineExceeded(_) => "deadline_exceeded",
            Self::ShuttingDown => "shutting_down",
            Self::InferenceFailed(_) => "inference_failed",
            Self::StorageFailed(_) => "storage_failed",
            Self::Unauthenticated(_) => "unauthenticated",
            Self::Forbidden(_) => "forbidden",
            Self::ModelLoadFailed(_) => "model_load_failed",
            Self::ModelIncompatible(_) => "model_incompatible",
        }
    }

    pub const ALL_CODES: [&'static str; 13] = [
        "invalid_request",
        "user_not_found",
        "categories_unavailable",
        "overloaded",
        "not_ready",
        "deadline_exceeded",
        "shutting_down",
        "inference_failed",
        "storage_failed",
        "unauthenticated",
        "forbidden",
        "model_load_failed",
        "model_incompatible",
    ];
}

/// `text` cut to [`MAX_QUOTED_BYTES`] (on a character boundary), marked when cut.
pub fn quote(text: &str) -> String {
    if text.len() <= MAX_QUOTED_BYTES {
        return text.to_owned();
    }
    let mut end = MAX_QUOTED_BYTES;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}… ({} bytes)", &text[..end], text.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quotes_are_bounded_and_cut_on_character_boundaries() {
        assert_eq!(quote("abc"), "abc");
        let long = "é".repeat(1000);
        let quoted = quote(&long);
        assert!(quoted.len() < MAX_QUOTED_BYTES + 32, "{}", quoted.len());
        assert!(quoted.ends_with("(2000 bytes)"));
        let err = CoreError::UserNotFound("x".repeat(1 << 20));
        assert!(err.to_string().len() < 200);
    }
}
