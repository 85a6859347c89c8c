//! What happens to a call before and after its handler: the caller's API key is checked before
//! tonic decodes anything (a client without a key cannot make the server decode its messages),
//! a unary call's body is watched as tonic reads it (one message, arriving within
//! `--body-read-timeout-ms`), and the failures tonic answers on its own (a message that does not
//! decode, one larger than `--max-body-bytes`, an unknown method) get the treatment a handler's
//! failures get: a fitting gRPC code, the stable `xsrec-code`, the request id, a count in the
//! metrics and a log line. tonic alone would answer INTERNAL (a client's mistake read as the
//! server's) or OUT_OF_RANGE, silently, and would take a second message of a unary call, drop it
//! and answer OK.
use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::http;
use bytes::Bytes;
use http_body::{Frame, SizeHint};
use tonic::body::Body;
use tonic::server::NamedService;
use tonic::{Code, Status};

use super::{failed, CallFailure, Caller, METHODS, SERVICE_NAME, XSREC_CODE};
use crate::recommend::error::quote;
use crate::recommend::Recommender;

/// The Recommender service behind its edge.
#[derive(Clone)]
pub struct Edge<S> {
    inner: S,
    core: Arc<Recommender>,
    body_read_timeout: Duration,
}

impl<S> Edge<S> {
    pub fn new(inner: S, core: Arc<Recommender>, body_read_timeout: Duration) -> Self {
        Self {
            inner,
            core,
            body_read_timeout,
        }
    }
}

impl<S> NamedService for Edge<S> {
    const NAME: &'static str = SERVICE_NAME;
}

type Answer = Pin<Box<dyn Future<Output = Result<http::Response<Body>, Infallible>> + Send>>;

/// The metrics' route for calls to methods the service does not have (REST's word for paths
/// no route matches): one label for any number of made-up names.
const UNMATCHED: &str = "unmatched";

/// The one method whose request is a stream of messages.
const STREAMED: &str = "/xsrec.v1.Recommender/IngestEventStream";

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
        let started = Instant::now();
        let headers = request.headers();
        let caller = Caller::from_entries(|name| headers.get(name).and_then(|v| v.to_str().ok()));
        let core = self.core.clone();
        let path = request.uri().path();
        let Some(&(method, operation)) = METHODS.iter().find(|(known, _)| *known == path) else {
            let unknown = CallFailure {
                status: Status::unimplemented(format!(
                    "no method {} in {SERVICE_NAME}; reflection lists its methods",
                    quote(path)
                )),
                code: "method_not_found",
                server_fault: false,
            };
            let status = failed(&core, UNMATCHED, &caller, started, unknown);
            return Box::pin(async move { Ok(status.into_http()) });
        };
        if let Err(refused) = core.authorize(operation, caller.key.as_deref()) {
            let status = failed(&core, method, &caller, started, refused.into());
            return Box::pin(async move { Ok(status.into_http()) });
        }
        let request = match method {
            STREAMED => request,
            _ => request.map(|body| Body::new(UnaryBody::new(body, self.body_read_timeout))),
        };
        // The instance that was polled ready serves this call; its clone waits for the next.
        let ready = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, ready);
        let max_body_bytes = core.limits.max_body_bytes;
        Box::pin(async move {
            let response = inner.call(request).await?;
            // Every failure a handler answers carries its code; one without came from tonic.
            let from_tonic = response
                .extensions()
                .get::<Status>()
                .filter(|status| status.code() != Code::Ok && status.metadata().get(XSREC_CODE).is_none());
            Ok(match from_tonic {
                Some(status) => {
                    let failure = transport_failure(status, max_body_bytes);
                    failed(&core, method, &caller, started, failure).into_http()
                }
                None => response,
            })
        })
    }
}

/// What a status tonic made on its own (or [`UnaryBody`] made for it) means for the client.
fn transport_failure(status: &Status, max_body_bytes: usize) -> CallFailure {
    let (code, xsrec_code, message) = match status.code() {
        // tonic's length check, before anything is buffered, and its bound on decompression.
        Code::OutOfRange | Code::ResourceExhausted => (
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
        Code::InvalidArgument => (Code::InvalidArgument, "malformed_message", status.message().to_owned()),
        Code::DeadlineExceeded => (Code::DeadlineExceeded, "body_timeout", status.message().to_owned()),
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

/// A unary call's request body, checked as tonic reads it: at most one message (tonic reads on
/// to the end, decoding and dropping any further one), and the whole body within the body read
/// timeout, as REST's bodies are (a client that stalls, inside its message or after it, is
/// answered rather than holding its stream for good). Its errors reach the edge as the call's
/// status.
struct UnaryBody {
    inner: Body,
    framing: Framing,
    deadline: Pin<Box<tokio::time::Sleep>>,
    timeout: Duration,
}

impl UnaryBody {
    fn new(inner: Body, timeout: Duration) -> Self {
        Self {
            inner,
            framing: Framing::default(),
            deadline: Box::pin(tokio::time::sleep(timeout)),
            timeout,
        }
    }
}

impl http_body::Body for UnaryBody {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        let this = self.get_mut();
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    if let Err(second) = this.framing.feed(data) {
                        return Poll::Ready(Some(Err(second)));
                    }
                }
                Poll::Ready(Some(Ok(frame)))
            }
            // tonic reads a unary body to its end before the handler runs, so a body still open
            // at the deadline is a stalled one, whether inside its message or after it.
            Poll::Pending if this.deadline.as_mut().poll(cx).is_ready() => {
                Poll::Ready(Some(Err(Status::deadline_exceeded(format!(
                    "the request message did not arrive within {} ms (--body-read-timeout-ms)",
                    this.timeout.as_millis()
                )))))
            }
            other => other,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// Where a body is in gRPC's framing: each message is a flag byte, a 4-byte big-endian length
/// and that many bytes.
#[derive(Debug, Default)]
struct Framing {
    header: [u8; 5],
    header_filled: usize,
    left_in_message: u64,
    messages: u32,
}

impl Framing {
    /// Follows `bytes`; refuses the start of a second message.
    fn feed(&mut self, mut bytes: &[u8]) -> Result<(), Status> {
        while !bytes.is_empty() {
            if self.left_in_message > 0 {
                let taken = bytes
                    .len()
                    .min(usize::try_from(self.left_in_message).unwrap_or(usize::MAX));
                self.left_in_message -= taken as u64;
                bytes = &bytes[taken..];
                continue;
            }
            if self.header_filled == 0 && self.messages == 1 {
                return Err(Status::invalid_argument(
                    "a unary method takes one request message; a second one followed",
                ));
            }
            let taken = bytes.len().min(self.header.len() - self.header_filled);
            self.header[self.header_filled..self.header_filled + taken].copy_from_slice(&bytes[..taken]);
            self.header_filled += taken;
            bytes = &bytes[taken..];
            if self.header_filled == self.header.len() {
                let length: [u8; 4] = self.header[1..].try_into().expect("four bytes");
                self.left_in_message = u64::from(u32::from_be_bytes(length));
                self.messages += 1;
                self.header_filled = 0;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(payload: &[u8]) -> Vec<u8> {
        let mut framed = vec![0];
        framed.extend((payload.len() as u32).to_be_bytes());
        framed.extend(payload);
        framed
    }

    /// However the bytes are cut into frames, one message passes and the first byte of a second
    /// is refused.
    #[test]
    fn framing_allows_one_message_in_any_cut_and_refuses_a_second() {
        for payload in [&b""[..], b"x", &[7u8; 300]] {
            let one = message(payload);
            let two = [one.clone(), message(b"more")].concat();
            for cut in 1..=one.len() + 1 {
                let mut framing = Framing::default();
                let fed: Result<(), Status> = two.chunks(cut).try_for_each(|chunk| framing.feed(chunk));
                assert!(fed.is_err(), "payload {} bytes, cut {cut}", payload.len());
                let mut framing = Framing::default();
                for chunk in one.chunks(cut) {
                    framing.feed(chunk).unwrap();
                }
                let state = (framing.messages, framing.header_filled, framing.left_in_message);
                assert_eq!(state, (1, 0, 0), "payload {} bytes, cut {cut}", payload.len());
                assert!(framing.feed(&[0]).is_err(), "the first byte of a second message");
            }
        }
    }
}
