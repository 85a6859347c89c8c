//! Request ids, for both front ends: the client's own (`x-request-id`) when it is a sensible
//! token, else a fresh UUID. It is echoed in the response and in error bodies, and names the
//! request in the log line written for every failed or shed request.
use std::time::Duration;

use super::CoreError;

/// Longest client id accepted as is (a longer one is replaced, so logs and bodies stay bounded).
const MAX_ID_BYTES: usize = 128;

/// `offered` if it is 1..=128 bytes of letters, digits and `-_.:/+=`, else a new UUID.
pub fn accept_or_generate(offered: Option<&str>) -> String {
    match offered {
        Some(id) if is_token(id) => id.to_owned(),
        _ => uuid::Uuid::new_v4().to_string(),
    }
}

fn is_token(id: &str) -> bool {
    (1..=MAX_ID_BYTES).contains(&id.len()) && id.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.:/+=".contains(&b))
}

/// The one log line of a failed or shed request: warning for the client's errors and for
/// shedding, error for the server's own failures.
pub fn log_failure(request_id: &str, operation: &str, status: &str, error: &Failure<'_>, elapsed: Duration) {
    let elapsed_ms = elapsed.as_secs_f64() * 1e3;
    let message = super::error::quote(error.message);
    // One field list for both levels (a tracing level must be known where the event is).
    macro_rules! failure_line {
        ($level:ident) => {
            tracing::$level!(
                request_id,
                operation,
                status,
                code = error.code,
                elapsed_ms,
                error = message,
                "request failed"
            )
        };
    }
    match error.server_fault {
        true => failure_line!(error),
        false => failure_line!(warn),
    }
}

/// What a failure log line says about the error.
pub struct Failure<'a> {
    pub code: &'a str,
    pub message: &'a str,
    /// The server failed at what it should have done (inference, storage, a panic), as opposed
    /// to a bad request, shedding, a deadline or a drain.
    pub server_fault: bool,
}

impl CoreError {
    /// Whether the server, not the request, is at fault.
    pub fn is_server_fault(&self) -> bool {
        matches!(self, Self::InferenceFailed(_) | Self::StorageFailed(_))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sensible_client_ids_are_kept_and_others_replaced_by_a_uuid() {
        for kept in [
            "abc-123",
            "7f3a9c1e-0b5d-4e2f-9a8b-1c2d3e4f5a6b",
            "trace:span/1+x=y",
            &"a".repeat(128),
        ] {
            assert_eq!(accept_or_generate(Some(kept)), kept);
        }
        for replaced in [
            None,
            Some(""),
            Some("has space"),
            Some("é"),
            Some("a\nb"),
            Some(&*"a".repeat(129)),
        ] {
            let id = accept_or_generate(replaced);
            assert!(uuid::Uuid::parse_str(&id).is_ok(), "{replaced:?} -> {id}");
        }
        assert_ne!(accept_or_generate(None), accept_or_generate(None));
    }
}
