//! What happens to a call before and after its handler: the caller's API key is checked before
//! tonic decodes anything (a client without a key cannot make the server decode its messages),
//! and the failures tonic answers on its own (a message that does not decode, one larger than
//! `--max-body-bytes`) get the treatment a handler's failures get: a fitting gRPC code, the
//! stable `xsrec-code`, the request id, a count in the metrics and a log line. tonic's codec
//! would answer INTERNAL (a client's mistake read as the server's) or OUT_OF_RANGE, silently.
use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use axum::http;
use tonic::body::Body;
use tonic::server::NamedService;
use tonic::{Code, Status};

use super::{failed, CallFailure, Caller, METHODS, SERVICE_NAME, XSREC_CODE};
use crate::recommend::Recommender;

/// The Recommender service behind its edge.
#[derive(Clone)]
pub struct Edge<S> {
    inner: S,
    core: Arc<Recommender>,
}

impl<S> Edge<S> {
    pub fn new(inner: S, core: Arc<Recommender>) -> Self {
        Self { inner, core }
    }
}

impl<S> NamedService for Edge<S> {
    const NAME: &'static str = SERVICE_NAME;
}

type Answer = Pin<Box<dyn Future<Output = Result<http::Response<Body>, Infallible>> + Send>>;

impl<S> tower::Service<http::Request<Body>> for Edge<S>
where
    S: tower::Service<http::Request<Body>, Response = http::Response<Body>, Error = Infallible>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = Answer;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<Body>) -> Answer {
        // The service answers unknown methods UNIMPLEMENTED itself.
        let Some(&(method, operation)) = METHODS.iter().find(|(path, _)| *path == request.uri().path()) else {
            return Box::pin(self.inner.call(request));
        };
        let started = Instant::now();
        let headers = request.headers();
        let caller = Caller::from_entries(|name| headers.get(name).and_then(|v| v.to_str().ok()));
        let core = self.core.clone();
        if let Err(refused) = core.authorize(operation, caller.key.as_deref()) {
            let status = failed(&core, method, &caller, started, refused.into());
            return Box::pin(async move { Ok(status.into_http()) });
        }
        // The instance that was polled ready serves this call; its clone waits for the next.
        let ready = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, ready);
        Box::pin(async move {
            let response = inner.call(request).await?;
            // Every failure a handler answers carries its code; one without came from tonic.
            let from_tonic = response
                .extensions()
                .get::<Status>()
                .filter(|status| status.code() != Code::Ok && status.metadata().get(XSREC_CODE).is_none());
            Ok(match from_tonic {
                Some(status) => {
                    let failure = transport_failure(status, core.limits.max_body_bytes);
                    failed(&core, method, &caller, started, failure).into_http()
                }
                None => response,
            })
        })
    }
}

/// What a status tonic made on its own means for the client.
fn transport_failure(status: &Status, max_body_bytes: usize) -> CallFailure {
    let (code, xsrec_code, message) = match status.code() {
        // tonic's length check, before anything is buffered.
        Code::OutOfRange => (
            Code::ResourceExhausted,
            "message_too_large",
            format!(
                "a request message exceeds the server's limit of {max_body_bytes} bytes (--max-body-bytes): {}",
                status.message()
            ),
        ),
        // prost's decode errors, a missing message, a bad compression flag: the client's bytes.
        Code::Internal => (
            Code::InvalidArgument,
            "malformed_message",
            format!("the request message does not decode: {}", status.message()),
        ),
        Code::Unimplemented => (Code::Unimplemented, "unsupported_encoding", status.message().to_owned()),
        // The stream broke (the client reset it, the connection went away).
        other => (other, "transport_error", status.message().to_owned()),
    };
    CallFailure {
        status: Status::new(code, message),
        code: xsrec_code,
        server_fault: false,
    }
}
